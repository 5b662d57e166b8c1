"""Token importance for eviction, from the model's own attention.

The real scorer captures the post-RoPE query of every layer for the last W prompt tokens (the
observation window) through llama.cpp's eval callback, in a separate context that holds the
saved state: the last W positions are removed and decoded again with capture on, so a prompt
that was already evaluated is not read again. Each window query attends over all cached keys
(softmax(q·k·scale), causal, GQA: query head h uses KV head h // (n_head / n_head_kv)); the
attention is summed over query heads and window tokens, averaged over layers, and shared by
all heads and layers, because the cache is shared.

The key-key proxy (the mean of the window's keys used as the query) needs no capture; it is
the fallback when capture is unavailable, and the header and report name it as such."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import llama_bridge as bridge
from .cache_values import layer_values, toggle_llama_rotation
from .errors import NxkvError
from .llama_state import LlamaState
from .state_file import value_dims

def _ggml():
    """ggml's exported accessors, from the library llama-cpp-python loaded (no struct layout
    is assumed, so one build works across the pinned llama.cpp range)."""
    from llama_cpp._ggml import libggml

    f = {}
    for name, res, args in (
        ("ggml_get_name", ctypes.c_char_p, [ctypes.c_void_p]),
        ("ggml_op_desc", ctypes.c_char_p, [ctypes.c_void_p]),
        ("ggml_nbytes", ctypes.c_size_t, [ctypes.c_void_p]),
        ("ggml_nelements", ctypes.c_int64, [ctypes.c_void_p]),
        ("ggml_is_contiguous", ctypes.c_bool, [ctypes.c_void_p]),
        ("ggml_backend_tensor_get", None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
    ):
        fn = getattr(libggml, name)
        fn.restype, fn.argtypes = res, args
        f[name] = fn
    return f


class QueryCapture:
    """The ctypes eval callback (the fallback where the native library is not built): keeps the
    ROPE-produced `Qcur-<layer>` nodes while `enabled`. Every other node is declined in the ask
    phase, so the scheduler computes the graph as usual between the wanted nodes."""

    name = "ctypes"

    def __init__(self, n_layer: int, per_layer: int):
        import llama_cpp

        self.g = _ggml()
        self.enabled = False
        self.queries: dict[int, list[np.ndarray]] = {}
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)  # kept alive here
        self.user_data = None

    def result(self) -> dict[int, np.ndarray]:
        return {layer: np.concatenate(parts) for layer, parts in self.queries.items()}

    def _wanted(self, t) -> Optional[int]:
        name = self.g["ggml_get_name"](t)
        if not name or not name.startswith(b"Qcur-") or self.g["ggml_op_desc"](t) != b"ROPE":
            return None
        try:
            return int(name[5:])
        except ValueError:
            return None

    def _on_node(self, t, ask, user_data):
        if not self.enabled:
            return not ask  # decline everything; "continue" in the data phase
        layer = self._wanted(t)
        if ask:
            return layer is not None
        if layer is not None and self.g["ggml_is_contiguous"](t):
            n = int(self.g["ggml_nelements"](t))
            buf = np.empty(n, np.float32)
            if int(self.g["ggml_nbytes"](t)) == 4 * n:  # f32 activations
                self.g["ggml_backend_tensor_get"](t, buf.ctypes.data, 0, 4 * n)
                self.queries.setdefault(layer, []).append(buf)
        return True


class NativeQueryCapture:
    """The same capture by the C callback in the native library (nxkv_capture_eval)."""

    name = "native"

    def __init__(self, n_layer: int, per_layer: int):
        import llama_cpp

        from .backends.native import Capture

        g = _ggml()
        address = lambda fn: ctypes.cast(fn, ctypes.c_void_p).value  # noqa: E731
        self.native = Capture({
            "get_name": address(g["ggml_get_name"]), "op_desc": address(g["ggml_op_desc"]),
            "nelements": address(g["ggml_nelements"]), "nbytes": address(g["ggml_nbytes"]),
            "is_contiguous": address(g["ggml_is_contiguous"]), "tensor_get": address(g["ggml_backend_tensor_get"]),
        }, n_layer, per_layer)
        self.per_layer = per_layer
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self.native.callback_address)
        self.user_data = self.native.user_data

    @property
    def enabled(self) -> bool:
        return self.native.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.native.enabled = value

    def result(self) -> dict[int, np.ndarray]:
        if self.native.errors:
            raise NxkvError(f"the native capture rejected {self.native.errors} query tensors (not f32 or not contiguous)")
        out = self.native.out.reshape(-1, self.per_layer)
        return {layer: out[layer, : int(n)].copy() for layer, n in enumerate(self.native.filled) if n}


def _capture_backend(name: Optional[str]):
    """NativeQueryCapture when the backend policy gives the native library, else QueryCapture."""
    from .backends import backend_name

    return NativeQueryCapture if (name or backend_name()) == "native" else QueryCapture


def capture_queries(llm, blob: bytes, tokens, window: int, impl: Optional[str] = None) -> dict[int, np.ndarray]:
    """Post-RoPE queries per layer, float32 [window, n_head, head_dim], for the last `window`
    tokens of the state `blob` (sequence 0 of a context like llm's). Raises NxkvError when
    llama.cpp does not give them (the caller then falls back to the proxy)."""
    import llama_cpp

    facts = bridge.model_facts(llm)
    n = len(tokens)
    window = min(window, n)
    per_layer = window * facts.n_head * facts.n_embd_head_k
    cap = _capture_backend(impl)(facts.n_layer, per_layer)
    p = llama_cpp.llama_context_default_params()
    src = llm.context_params
    p.n_ctx = int(llm.n_ctx())
    p.n_batch = p.n_ubatch = max(window, 1)
    p.n_seq_max = 1
    p.n_threads = p.n_threads_batch = int(src.n_threads)
    p.type_k, p.type_v = src.type_k, src.type_v
    p.flash_attn_type = src.flash_attn_type
    p.swa_full = src.swa_full
    p.cb_eval = cap.callback
    p.cb_eval_user_data = cap.user_data
    ctx = llama_cpp.llama_init_from_model(llm._model.model, p)
    if not ctx:
        raise NxkvError("llama.cpp could not create the capture context")
    try:
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        if llama_cpp.llama_state_seq_set_data(ctx, buf, len(blob), 0) != len(blob):
            raise NxkvError("the capture context refused the state")
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, n - window, -1)
        batch = llama_cpp.llama_batch_init(window, 0, 1)
        try:
            for i in range(window):
                batch.token[i] = int(tokens[n - window + i])
                batch.pos[i] = n - window + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == window - 1
            batch.n_tokens = window
            cap.enabled = True
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise NxkvError("llama.cpp failed to decode the observation window")
        finally:
            cap.enabled = False
            llama_cpp.llama_batch_free(batch)
    finally:
        llama_cpp.llama_free(ctx)
    out = {}
    for layer, q in cap.result().items():
        if q.size != window * facts.n_head * facts.n_embd_head_k:
            raise NxkvError(f"captured Qcur-{layer} has {q.size} values, expected {window}x{facts.n_head}x{facts.n_embd_head_k}")
        out[layer] = q.reshape(window, facts.n_head, facts.n_embd_head_k)
    if len(out) < facts.n_layer:
        raise NxkvError(f"captured queries of {len(out)} of {facts.n_layer} layers")
    return out


def attention_importance(q: np.ndarray, q_pos: np.ndarray, k: np.ndarray, k_pos: np.ndarray, scale: float) -> np.ndarray:
    """Attention mass each cached key receives from the window queries of one layer, summed
    over query heads and tokens. q [W, n_head, d], k [n_cells, n_kv, d] (both post-RoPE)."""
    n_head, n_kv = q.shape[1], k.shape[1]
    group = n_head // n_kv
    out = np.zeros(k.shape[0])
    causal = k_pos[None, :] <= q_pos[:, None]  # [W, n_cells]
    for h in range(n_head):
        logits = (q[:, h, :].astype(np.float64) @ k[:, h // group, :].astype(np.float64).T) * scale
        logits = np.where(causal, logits, -np.inf)
        logits -= logits.max(axis=1, keepdims=True)
        w = np.exp(logits)
        out += (w / w.sum(axis=1, keepdims=True)).sum(axis=0)
    return out


@dataclass
class Scores:
    importance: np.ndarray  # float64 [n_cells] of the scored stream, higher = keep
    scorer: str  # what was actually used
    note: str = ""  # why the attention scorer was not used


def score_cells(llm, blob: bytes, state: LlamaState, tokens, window: int, scorer: str) -> Scores:
    """Importance of each cell of the state's first (full-attention) stream."""
    facts = bridge.model_facts(llm)
    cache = state.caches[0]
    streams = [s for s in cache.streams if s is not None]
    if len(streams) != 1:
        raise NxkvError("eviction supports one sequence in one stream")
    s = streams[0]
    pos = s.cells.pos.astype(np.int64)
    n = len(tokens)
    q_pos = np.arange(n - min(window, n), n)
    hd = facts.n_embd_head_k
    rot = value_dims(hd, facts.n_embd_head_v)["llama_rot_k"]
    note = ""
    queries = None
    if scorer == "attention":
        try:
            queries = capture_queries(llm, blob, tokens, window)
        except NxkvError as e:
            note = f"query capture failed ({e}); used the key-key proxy"
    total = np.zeros(len(pos))
    for layer in s.layers:
        k = toggle_llama_rotation(layer_values(layer, "k", s.v_trans), layer.k_type, rot).reshape(len(pos), -1, hd)
        if queries is not None:
            q = queries[layer.model_layer]
        else:
            # proxy: the window's own keys, one query per KV head
            in_window = np.isin(pos, q_pos)
            q = k[in_window].mean(axis=0, keepdims=True)
        imp = attention_importance(q, q_pos if queries is not None else q_pos[-1:], k, pos, 1.0 / np.sqrt(hd))
        total += imp / imp.sum()
    return Scores(total / len(s.layers), "attention" if queries is not None else "key-proxy", note)
