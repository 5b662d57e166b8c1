"""Query capture: the post-RoPE queries llama.cpp computes, taken from its graph through the
eval callback (ggml_backend_sched_eval_callback), for attention-importance scoring. Beside
llama_bridge, the only other module that calls llama.cpp: it builds its own context and batch.
That context takes the saved state, the last W positions are removed and decoded again with the
capture on, so a prompt that was already evaluated is not read again.

The C callback of the native library does the work where the library is built; a ctypes
callback does the same otherwise. Only ggml's exported accessors are used, looked up in the
ggml library llama-cpp-python loaded, so no ggml struct layout is assumed."""

from __future__ import annotations

import ctypes
import os
from typing import Optional

import numpy as np

from . import llama_bridge as bridge
from .errors import NxkvError


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
    """The ctypes eval callback (where the native library is not built): keeps the f32 data of
    the ROPE-produced `Qcur-<layer>` nodes while `enabled`, at most `per_layer` values for each
    of `n_layer` layers; nodes that do not fit, are not contiguous or not f32 count in `errors`,
    exactly as the C callback (nxkv_capture_eval) does. Every other node is declined in the ask
    phase, so the scheduler computes the graph as usual between the wanted nodes."""

    name = "ctypes"

    def __init__(self, n_layer: int, per_layer: int):
        import llama_cpp

        self.g = _ggml()
        self.n_layer, self.per_layer = n_layer, per_layer
        self.enabled = False
        self.errors = 0
        self.queries: dict[int, list[np.ndarray]] = {}
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)  # kept alive here
        self.user_data = None

    def reset(self) -> None:
        self.queries, self.errors = {}, 0

    def result(self) -> dict[int, np.ndarray]:
        if self.errors:
            raise NxkvError(f"the capture rejected {self.errors} query tensors (not f32, not contiguous or too large)")
        return {layer: np.concatenate(parts) for layer, parts in self.queries.items()}

    def _wanted(self, t) -> Optional[int]:
        name = self.g["ggml_get_name"](t)
        if not name or not name.startswith(b"Qcur-") or self.g["ggml_op_desc"](t) != b"ROPE":
            return None
        try:
            layer = int(name[5:])
        except ValueError:
            return None
        return layer if 0 <= layer < self.n_layer else None

    def _on_node(self, t, ask, user_data):
        if not self.enabled:
            return not ask  # decline everything; "continue" in the data phase
        layer = self._wanted(t)
        if ask or layer is None:
            return layer is not None if ask else True
        n = int(self.g["ggml_nelements"](t))
        filled = sum(q.size for q in self.queries.get(layer, []))
        if n <= 0 or int(self.g["ggml_nbytes"](t)) != 4 * n or not self.g["ggml_is_contiguous"](t) or filled + n > self.per_layer:
            self.errors += 1
            return True
        buf = np.empty(n, np.float32)
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

    def reset(self) -> None:
        self.native.reset()

    def result(self) -> dict[int, np.ndarray]:
        if self.native.errors:
            raise NxkvError(f"the native capture rejected {self.native.errors} query tensors (not f32, not contiguous or too large)")
        out = self.native.out.reshape(-1, self.per_layer)
        return {layer: out[layer, : int(n)].copy() for layer, n in enumerate(self.native.filled) if n}


def _capture_backend(name: Optional[str]):
    """NativeQueryCapture when the backend policy gives the native library, else QueryCapture."""
    from .backends import backend_name

    return NativeQueryCapture if (name or backend_name()) == "native" else QueryCapture


class CaptureContext:
    """A llama.cpp context beside the Llama's, on the same model and cache types, whose decodes
    capture every layer's post-RoPE queries (up to `max_tokens` tokens a decode)."""

    def __init__(self, llm, n_ctx: int, max_tokens: int, impl: Optional[str] = None):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.facts = bridge.model_facts(llm)
        self.per_token = self.facts.n_head * self.facts.n_embd_head_k
        self.max_tokens = max_tokens
        self.impl = impl
        self.cap = _capture_backend(impl)(self.facts.n_layer, max_tokens * self.per_token)
        p = llama_cpp.llama_context_default_params()
        src = llm.context_params
        p.n_ctx = int(n_ctx)
        p.n_batch = p.n_ubatch = max(max_tokens, 1)
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = int(src.n_threads)
        p.type_k, p.type_v = src.type_k, src.type_v
        p.flash_attn_type = src.flash_attn_type
        p.swa_full = src.swa_full
        p.cb_eval = self.cap.callback
        p.cb_eval_user_data = self.cap.user_data
        with bridge.quiet():
            self.ctx = llama_cpp.llama_init_from_model(llm._model.model, p)
        if not self.ctx:
            raise NxkvError("llama.cpp could not create the capture context")

    def __enter__(self) -> "CaptureContext":
        return self

    def __exit__(self, *exc) -> None:
        self.llama_cpp.llama_free(self.ctx)

    def set_state(self, blob) -> None:
        """Sequence 0 from `blob`: a state in memory (read in place: no copy of a state that may
        be gigabytes), or the path of a llama.cpp sequence state file (llama.cpp reads it a
        layer at a time: no copy of it in memory at all)."""
        if isinstance(blob, (str, os.PathLike)):
            count = ctypes.c_size_t(0)
            no_tokens = (self.llama_cpp.llama_token * 1)()
            if not self.llama_cpp.llama_state_seq_load_file(self.ctx, os.fsencode(blob), 0, no_tokens, 0, ctypes.byref(count)):
                raise NxkvError("the capture context refused the state")
            return
        n = memoryview(blob).nbytes
        if self.llama_cpp.llama_state_seq_set_data(self.ctx, bridge.read_only_pointer(blob), n, 0) != n:
            raise NxkvError("the capture context refused the state")

    def remove_from(self, pos: int) -> None:
        """Drop the cells at positions >= pos."""
        self.llama_cpp.llama_memory_seq_rm(self.llama_cpp.llama_get_memory(self.ctx), 0, pos, -1)

    def decode(self, tokens, first_pos: int) -> dict[int, np.ndarray]:
        """Decode `tokens` at positions first_pos, first_pos + 1, ...: the queries per layer,
        float32 [len(tokens), n_head, head_dim]."""
        llama_cpp = self.llama_cpp
        m = len(tokens)
        if not 0 < m <= self.max_tokens:
            raise NxkvError(f"capture decodes 1..{self.max_tokens} tokens at a time, not {m}")
        self.cap.reset()
        batch = llama_cpp.llama_batch_init(m, 0, 1)
        try:
            for i in range(m):
                batch.token[i] = int(tokens[i])
                batch.pos[i] = first_pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == m - 1
            batch.n_tokens = m
            self.cap.enabled = True
            if llama_cpp.llama_decode(self.ctx, batch) != 0:
                raise NxkvError("llama.cpp failed to decode the tokens to capture")
        finally:
            self.cap.enabled = False
            llama_cpp.llama_batch_free(batch)
        out = {}
        for layer, q in self.cap.result().items():
            if q.size != m * self.per_token:
                raise NxkvError(f"captured Qcur-{layer} has {q.size} values, expected {m}x{self.per_token}")
            out[layer] = q.reshape(m, self.facts.n_head, self.facts.n_embd_head_k)
        if len(out) < self.facts.n_layer:
            raise NxkvError(f"captured queries of {len(out)} of {self.facts.n_layer} layers")
        return out


def capture_queries(llm, blob, tokens, window: int, impl: Optional[str] = None,
                    n_ctx: Optional[int] = None) -> dict[int, np.ndarray]:
    """Post-RoPE queries per layer, float32 [window, n_head, head_dim], for the last `window`
    tokens of the state `blob` (sequence 0 of a context like llm's; in memory, or the path of a
    llama.cpp sequence state file: CaptureContext.set_state): they are removed and decoded
    again with the capture on. n_ctx: the capture context's cells (default llm's; the blob's
    cells must fit). Raises NxkvError when llama.cpp does not give them (the caller then falls
    back to the proxy)."""
    n = len(tokens)
    window = min(window, n)
    with CaptureContext(llm, int(n_ctx or llm.n_ctx()), window, impl) as cc:
        cc.set_state(blob)
        cc.remove_from(n - window)
        return cc.decode(tokens[n - window :], n - window)
