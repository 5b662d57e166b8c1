"""Everything that touches llama-cpp-python: model facts, state get/set, logits, prefill.
Other modules work on bytes and arrays and never import llama_cpp."""

from __future__ import annotations

import ctypes
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .errors import NxkvError, RestoreError
from .gguf_file import read_gguf_header
from .llama_state import StateLayout, check_supported_memory

ROPE_TYPES = {-1: "none", 0: "norm", 2: "neox", 8: "mrope", 40: "imrope", 24: "vision"}
FLASH_ATTN_TYPES = {-1: "auto", 0: "disabled", 1: "enabled"}

# Sliding-window pattern each architecture's loader sets when the GGUF does not say
# (llama.cpp src/models/*.cpp load_swa_pattern): arch -> (n_pattern, dense_first)
SWA_PATTERN_DEFAULTS = {
    "gemma2": (2, False), "gemma3": (6, False), "gemma3n": (5, False), "gemma-embedding": (6, False),
    "cohere2": (4, False), "llama4": (4, False), "gpt-oss": (2, False), "exaone4": (4, False),
    "olmo2": (4, False), "smallthinker": (4, True), "plamo3": (8, False), "afmoe": (4, False),
}


@dataclass
class ModelFacts:
    fingerprint: str
    file_name: str
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    n_embd_head_k: int
    n_embd_head_v: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int
    rope: dict[str, Any]
    sliding_layers: list[int] = field(default_factory=list)
    name: str = ""  # general.name, for messages
    weights: str = ""  # GgufHeader.weight_types: tells two quantizations of one model apart in messages

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def state_layout(self) -> StateLayout:
        has_ext = self.rope["type"] in ("mrope", "imrope", "vision") or None  # else: let the parser find out
        return _state_layout(has_ext, self.n_layer, self.sliding_layers if self.n_swa > 0 else None)


def _state_layout(has_ext, n_layer: int, sliding_layers) -> StateLayout:
    """Model layers of each cache: one cache, or (iSWA, sliding_layers given) the base one and
    the sliding-window one."""
    if sliding_layers is not None:
        swa = set(sliding_layers)
        return StateLayout(has_ext, [[i for i in range(n_layer) if i not in swa], sorted(swa)], [False, True])
    return StateLayout(has_ext, [list(range(n_layer))], [False])


def _sliding_layers(header, n_layer: int, n_swa: int) -> list[int]:
    if n_swa <= 0:
        return []
    pattern = header.arch_key("attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) >= n_layer:
        return [i for i in range(n_layer) if pattern[i]]
    dense_first = False
    if isinstance(pattern, int):
        n_pattern = pattern
    elif header.arch in SWA_PATTERN_DEFAULTS:
        n_pattern, dense_first = SWA_PATTERN_DEFAULTS[header.arch]
    else:
        return []  # unknown: layers stay unnamed rather than guessed
    if dense_first:
        return [i for i in range(n_layer) if n_pattern == 0 or i % n_pattern != 0]
    return [i for i in range(n_layer) if n_pattern == 0 or i % n_pattern < n_pattern - 1]


def _llama_cpp():
    """The llama_cpp module, or a clear error where llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError as e:
        raise NxkvError(f"llama-cpp-python is not installed ({e}); run: pip install nexus-gguf") from None
    return llama_cpp


def quiet():
    """Silences what llama.cpp prints on its own (some of its warnings bypass the log callback
    that llama-cpp-python's verbose=False sets) while a model or context is made."""
    from llama_cpp._utils import suppress_stdout_stderr

    return suppress_stdout_stderr(disable=False)


def open_llama(model: str, n_ctx: int, threads: Optional[int] = None, n_gpu_layers: int = 0, **kw):
    """A llama_cpp.Llama of the GGUF file `model`, quiet, on `threads` CPU threads (default: all).
    A missing file or one that is not GGUF is a clear error before llama.cpp sees it."""
    check_model_file(model)
    llama_cpp = _llama_cpp()
    with quiet():
        return llama_cpp.Llama(model, n_ctx=n_ctx, n_threads=threads or max(1, os.cpu_count() or 1),
                               n_gpu_layers=n_gpu_layers, verbose=False, **kw)


def check_model_file(model: str) -> None:
    """A clear error unless `model` is a readable GGUF file (before llama.cpp sees it)."""
    if not os.path.isfile(model):
        if os.path.isdir(model):
            raise NxkvError(f"{model} is a directory, not a model file")
        raise NxkvError(f"{model}: no such model file" if not os.path.exists(model) else f"{model} is not a regular file")
    try:
        read_gguf_header(model)  # FormatError: not a GGUF file (bad magic), truncated, ...
    except OSError as e:
        raise NxkvError(f"{model}: cannot read the model ({e.strerror or e})") from None


def state_layout_of_file(model: str) -> StateLayout:
    """What a state blob does not say about its layers, from the GGUF alone (no weights loaded):
    model layers of each cache, sliding-window layers. M-RoPE cell records are found by parsing."""
    header = read_gguf_header(model)
    n_layer = int(header.arch_key("block_count", 0) or 0)
    n_swa = int(header.arch_key("attention.sliding_window", 0) or 0)
    return _state_layout(None, n_layer, _sliding_layers(header, n_layer, n_swa) if n_swa > 0 else None)


def trained_context(model: str) -> int:
    """The context length the GGUF says the model was trained with (0 if it does not say)."""
    return int(read_gguf_header(model).arch_key("context_length", 0) or 0)


def tokenize(llm, text: str, add_bos: bool) -> list[int]:
    """Tokens of `text` as the model reads a prompt (special tokens parsed)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)


def count_tokens(model: str, text: str) -> int:
    """Tokens `text` takes as a prompt, from the model's vocabulary alone (no weights loaded)."""
    return len(tokenize(open_llama(model, 512, vocab_only=True), text, add_bos=True))


def model_facts(llm) -> ModelFacts:
    llama_cpp = _llama_cpp()

    cached = getattr(llm, "_nexus_gguf_facts", None)
    if cached is not None:
        return cached
    model = llm._model.model
    header = read_gguf_header(llm.model_path)
    arch = header.arch
    check_supported_memory(
        bool(llama_cpp.llama_model_is_recurrent(model)), bool(llama_cpp.llama_model_is_hybrid(model)), arch
    )
    n_layer = int(llama_cpp.llama_model_n_layer(model))
    n_head = int(llama_cpp.llama_model_n_head(model))
    n_embd = int(llama_cpp.llama_model_n_embd(model))
    n_head_kv = int(llama_cpp.llama_model_n_head_kv(model))
    head_k = int(header.arch_key("attention.key_length", n_embd // max(n_head, 1)))
    head_v = int(header.arch_key("attention.value_length", n_embd // max(n_head, 1)))
    n_swa = int(llama_cpp.llama_model_n_swa(model))
    rope = {
        "type": ROPE_TYPES.get(int(llama_cpp.llama_model_rope_type(model)), "unknown"),
        "n_rot": int(header.arch_key("rope.dimension_count", head_k)),
        "freq_base": float(header.arch_key("rope.freq_base", 10000.0)),
        "freq_base_swa": header.arch_key("rope.freq_base_swa"),
        "freq_scale_train": float(llama_cpp.llama_model_rope_freq_scale_train(model)),
        "scaling_type": header.arch_key("rope.scaling.type"),
        "scaling_factor": header.arch_key("rope.scaling.factor"),
        "original_context_length": header.arch_key("rope.scaling.original_context_length"),
    }
    facts = ModelFacts(
        fingerprint=header.fingerprint,
        file_name=llm.model_path.replace("\\", "/").rsplit("/", 1)[-1],
        arch=arch,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_embd=n_embd,
        n_embd_head_k=head_k,
        n_embd_head_v=head_v,
        n_vocab=int(llm.n_vocab()),
        n_ctx_train=int(llama_cpp.llama_model_n_ctx_train(model)),
        n_swa=n_swa,
        rope=rope,
        sliding_layers=_sliding_layers(header, n_layer, n_swa),
        name=str(header.metadata.get("general.name", "")),
        weights=header.weight_types,
    )
    llm._nexus_gguf_facts = facts
    return facts


def context_facts(llm, rope: bool = False) -> dict[str, Any]:
    """The context parameters a state depends on; with rope=True also the RoPE overrides the
    context was made with (0 or negative: the model's own value)."""
    p = llm.context_params
    out = {
        "n_ctx": int(llm.n_ctx()),
        "type_k": int(p.type_k),
        "type_v": int(p.type_v),
        "flash_attn": FLASH_ATTN_TYPES.get(int(p.flash_attn_type), str(p.flash_attn_type)),
        "swa_full": bool(p.swa_full),
    }
    if rope:
        for key in ("rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_beta_fast", "yarn_beta_slow"):
            out[key] = float(getattr(p, key))
        out["yarn_orig_ctx"] = int(p.yarn_orig_ctx)
        out["rope_scaling_type"] = int(p.rope_scaling_type)
    return out


def holds_cells(llm, seq_id: int = 0) -> bool:
    """Whether sequence seq_id of the Llama's context holds any cell."""
    llama_cpp = _llama_cpp()
    return int(llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm._ctx.ctx), seq_id)) >= 0


def _fill(out, size: int, fill) -> int:
    """The n bytes fill(pointer, size) -> n writes straight into the writable buffer `out` of
    `size` bytes (states are gigabytes for large models: no second copy)."""
    n = int(fill((ctypes.c_uint8 * size).from_buffer(out), size))
    if n == 0 or n > size:
        raise NxkvError("llama.cpp failed to copy the state (see its log)")
    return n


def _filled(size: int, fill) -> bytearray:
    """A bytearray of at most `size` bytes that fill writes into directly (_fill)."""
    out = bytearray(size)
    del out[_fill(out, size, fill) :]
    return out


def read_only_pointer(blob):
    """A uint8 pointer to the bytes of `blob` for a C function that only reads them, without a
    copy where the object allows (bytes, bytearray, writable buffers)."""
    if isinstance(blob, bytes):
        return ctypes.cast(ctypes.c_char_p(blob), ctypes.POINTER(ctypes.c_uint8))
    view = memoryview(blob)
    if view.readonly or not view.c_contiguous:
        return (ctypes.c_uint8 * view.nbytes).from_buffer_copy(view)
    return (ctypes.c_uint8 * view.nbytes).from_buffer(view.cast("B"))


def get_seq_state(llm, seq_id: int = 0, pages: bool = False):
    """llama_state_seq_get_data for one sequence (bytes-like). pages: into a heap.PageBuffer,
    returned with it as (uint8 array, buffer), so that parts can be given back."""
    llama_cpp = _llama_cpp()

    ctx = llm._ctx.ctx
    size = int(llama_cpp.llama_state_seq_get_size(ctx, seq_id))
    if size == 0:
        raise NxkvError("llama.cpp could not size the sequence state (see its log)")
    fill = lambda buf, n: llama_cpp.llama_state_seq_get_data(ctx, buf, n, seq_id)  # noqa: E731
    if not pages:
        return _filled(size, fill)
    from .heap import PageBuffer

    buf = PageBuffer(size)
    return buf.array[: _fill(buf.array, size, fill)], buf


def set_seq_state(llm, blob, seq_id: int = 0) -> bool:
    """llama_state_seq_set_data of a bytes-like blob; True on success. On failure llama.cpp has
    cleared the sequence."""
    import llama_cpp

    n = memoryview(blob).nbytes
    return int(llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, read_only_pointer(blob), n, seq_id)) == n


def get_context_state(llm) -> bytearray:
    """llama_state_get_data: the whole context (every sequence), bytes-like."""
    llama_cpp = _llama_cpp()
    ctx = llm._ctx.ctx
    size = int(llama_cpp.llama_state_get_size(ctx))
    return _filled(size, lambda buf, n: llama_cpp.llama_state_get_data(ctx, buf, n))


def set_context_state(llm, blob) -> bool:
    """llama_state_set_data of a bytes-like blob; True on success."""
    llama_cpp = _llama_cpp()
    n = memoryview(blob).nbytes
    return int(llama_cpp.llama_state_set_data(llm._ctx.ctx, read_only_pointer(blob), n)) == n


def clear_seq(llm, seq_id: int = 0) -> None:
    import llama_cpp

    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm._ctx.ctx), seq_id, -1, -1)


def last_logits(llm) -> Optional[np.ndarray]:
    """The next-token logits of the last evaluated token, or None when the context's logits do
    not belong to it (a Llama restored from a state has not decoded anything since)."""
    import llama_cpp

    if llm.n_tokens == 0 or getattr(llm, "_requires_eval", False):
        return None
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    if not ptr:
        return None
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32, copy=True)


def set_prompt(llm, tokens: np.ndarray, logits: Optional[np.ndarray]) -> None:
    """Make the Llama's bookkeeping agree with a restored cache of `tokens`, as
    llama-cpp-python's own Llama.load_state does: the context's logits are stale, so the next
    generate() replays the last token before sampling; eval() continues at position n."""
    n = int(tokens.shape[0])
    llm.input_ids[:n] = tokens
    llm.n_tokens = n
    llm._requires_eval = True
    if logits is not None and getattr(llm, "_logits_all", False) and n <= llm.scores.shape[0]:
        llm.scores[n - 1, :] = logits


def prefill(llm, tokens: Sequence[int], progress: Optional[Callable[[int, int], None]] = None) -> None:
    """llm.eval in n_batch chunks, reporting (done, total) after each."""
    tokens = list(tokens)
    if len(tokens) > llm.n_ctx():
        raise NxkvError(f"the prompt has {len(tokens)} tokens but the context holds {llm.n_ctx()}; raise n_ctx")
    step = max(1, int(llm.n_batch))
    for i in range(0, len(tokens), step):
        llm.eval(tokens[i : i + step])
        if progress:
            progress(min(i + step, len(tokens)), len(tokens))


def eval_logits(llm, tokens: Sequence[int], start_pos: int) -> np.ndarray:
    """Decode `tokens` into sequence 0 at positions start_pos, start_pos + 1, ... and return
    the next-token logits after each, float32 [len(tokens), n_vocab]. Low level: the Llama's
    own bookkeeping (n_tokens, input_ids) is not updated; callers clear the sequence after."""
    import llama_cpp

    tokens = list(tokens)
    n_vocab = int(llm.n_vocab())
    out = np.empty((len(tokens), n_vocab), np.float32)
    step = max(1, int(llm.n_batch))
    for i in range(0, len(tokens), step):
        chunk = tokens[i : i + step]
        llm._batch.set_batch(chunk, n_past=start_pos + i, logits_all=True)
        llm._ctx.decode(llm._batch)
        ptr = llama_cpp.llama_get_logits(llm._ctx.ctx)
        out[i : i + len(chunk)] = np.ctypeslib.as_array(ptr, shape=(len(chunk), n_vocab))
    return out


def software_versions() -> dict[str, str]:
    import llama_cpp

    from . import __version__

    return {"nexus_gguf": __version__, "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown")}


def context_capacity(llm) -> int:
    """How many cells a restored prompt may hold: llama.cpp may round n_ctx up, the Llama's own
    token buffer keeps the size asked for."""
    return min(int(llm.n_ctx()), int(llm.input_ids.shape[0]))


def require_restorable(llm, header) -> None:
    """Checks that need no llama.cpp call: the context is big enough (header: a header.Header).
    Other cache types and V layouts are converted (cache_target)."""
    need = max(header.n_ctx_required, header.n_tokens)
    capacity = context_capacity(llm)
    if capacity < need:
        raise RestoreError(f"the state needs a context of at least {need} tokens; this Llama holds {capacity} (n_ctx)")


def stream_of(llm, seq_id: int) -> tuple[int, int]:
    """(streams in the Llama's cache, the stream sequence seq_id lives in): one stream unless
    the context keeps a non-unified cache for several sequences (one stream each)."""
    p = llm.context_params
    n_seq = max(1, int(p.n_seq_max))
    if n_seq == 1 or bool(p.kv_unified):
        return 1, 0
    return n_seq, seq_id


def cache_target(llm):
    """(K type, V type, V transposed or None when flash attention is "auto" and llama.cpp
    decided) of the Llama's cache: what a restored state must be written as."""
    from .ggml_types import ggml_type

    here = context_facts(llm)
    k_type, v_type = ggml_type(here["type_k"]), ggml_type(here["type_v"])
    if not v_type.float_bytes:  # llama.cpp keeps a quantized V only with flash attention: by rows
        return k_type, v_type, False
    return k_type, v_type, {"enabled": False, "disabled": True}.get(here["flash_attn"])
