"""What the sections of a .nxkv file hold: a LlamaState, its prompt tokens and last logits
turned into named sections plus the header's "state" layout, and back."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import numpy as np

from .cache_values import layer_from_values, layer_values, llama_rotation_blocks, llama_rotation_disabled, toggle_llama_rotation
from .errors import FormatError, StateLayoutError
from .ggml_types import ggml_type_by_name
from .llama_state import Cache, Cells, LayerKV, LlamaState, Stream, parse_cells
from .pipeline import Pipeline, meta_pipeline
from .stages import TensorInfo

_MAX_TOKENS = 1 << 26


def _meta_info(name: str, n_bytes: int) -> TensorInfo:
    return TensorInfo(name, "raw", 0, n_bytes)


def value_dims(head_dim_k: int, head_dim_v: int) -> dict[str, int]:
    """What the value path needs to know about a model's cache rows: head sizes, and the
    Hadamard block llama.cpp rotated the rows of a quantized cache with (0: none), which is
    undone before the stages and redone when rows go back into a quantized cache."""
    disabled = llama_rotation_disabled()
    return {
        "head_dim_k": head_dim_k,
        "head_dim_v": head_dim_v,
        "llama_rot_k": 0 if disabled else llama_rotation_blocks(head_dim_k, "k"),
        "llama_rot_v": 0 if disabled else llama_rotation_blocks(head_dim_v, "v"),
    }


def _tensor_info(name, kind, t, n_bytes, cells: Cells, layer_model, sliding, n_embd, dims) -> TensorInfo:
    head_dim = dims[f"head_dim_{kind}"] if dims else 0
    if dims and (head_dim <= 0 or n_embd % head_dim):
        raise StateLayoutError(f"{name}: rows of {n_embd} values are not whole heads of {head_dim}")
    # symbol streams hold at most one value per cache value, whatever the cache type's size
    return TensorInfo(
        name, t.name, t.float_bytes, max(n_bytes, len(cells) * n_embd), kind=kind, positions=cells.pos, model_layer=layer_model,
        sliding=sliding, n_cells=len(cells), n_heads=n_embd // head_dim if dims else 0, head_dim=head_dim,
    )


def _absorbed_rotation(pipeline: Pipeline, info: TensorInfo, t, dims) -> TensorInfo:
    """info with llama_rot set when a stage absorbs llama.cpp's rotation of these rows (they
    then stay rotated); unchanged when the rows must be un-rotated first (_llama_rotation)."""
    block = dims[f"llama_rot_{info.kind}"] if not t.float_bytes else 0
    return replace(info, llama_rot=block) if pipeline.absorbs_rotation(info, block) else info


def _llama_rotation(values: np.ndarray, t, info: TensorInfo, dims) -> np.ndarray:
    """Undo (or redo) llama.cpp's rotation of a quantized cache's rows, unless a stage absorbs it."""
    return values if info.llama_rot else toggle_llama_rotation(values, t, dims[f"llama_rot_{info.kind}"])


def encode_state(state: LlamaState, pipeline: Pipeline, dims: Optional[dict[str, int]] = None) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """(layout for the header, sections) of a parsed state. The value path needs `dims`
    (value_dims of the model)."""
    if pipeline.values_path and not dims:
        raise StateLayoutError("the lossy stages need the model's head sizes")
    meta = meta_pipeline()
    sections = []
    caches = []
    for ci, cache in enumerate(state.caches):
        streams = []
        for si, s in enumerate(cache.streams):
            if s is None:
                streams.append(None)
                continue
            cells = np.frombuffer(s.cells.to_bytes(), np.uint8)
            name = f"cells.{ci}.{si}"
            sections.append((name, meta.encode(cells, _meta_info(name, cells.size))))
            layers = []
            for layer in s.layers:
                for kind, arr, t in (("k", layer.k, layer.k_type), ("v", layer.v, layer.v_type)):
                    name = f"{kind}.{ci}.{si}.{layer.cache_layer}"
                    if pipeline.values_path:
                        values = layer_values(layer, kind, s.v_trans)
                        info = _tensor_info(name, kind, t, arr.size, s.cells, layer.model_layer, layer.sliding_window,
                                            values.shape[1], dims)
                        info = _absorbed_rotation(pipeline, info, t, dims)
                        sections.append((name, pipeline.encode_values(_llama_rotation(values, t, info, dims), info)))
                    else:
                        flat = np.ascontiguousarray(arr).reshape(-1)
                        info = TensorInfo(name, t.name, t.float_bytes, flat.size)
                        sections.append((name, pipeline.encode(flat, info)))
                layers.append(
                    {
                        "model_layer": layer.model_layer,
                        "sliding_window": layer.sliding_window,
                        "k_type": layer.k_type.name,
                        "k_shape": list(layer.k.shape),
                        "v_type": layer.v_type.name,
                        "v_shape": list(layer.v.shape),
                    }
                )
            streams.append({"n_cells": len(s.cells), "cell_bytes": int(cells.size), "v_trans": s.v_trans, "layers": layers})
        caches.append({"name": cache.name, "streams": streams})
    layout = {
        "kind": state.kind,
        "arch": state.arch,
        "seq_id": state.seq_id,
        "has_cell_ext": state.has_cell_ext,
        "caches": caches,
    }
    if pipeline.values_path:
        layout["values"] = dict(dims)
    return layout, sections


def _shape(v, what: str, limit: int) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and 0 < x for x in v)):
        raise FormatError(f"{what}: invalid shape {v!r}")
    if v[0] * v[1] > limit:
        raise FormatError(f"{what}: shape {v!r} is larger than the file could hold")
    return v[0], v[1]


def decode_state(layout: dict[str, Any], pipeline: Pipeline, section, limit: int) -> LlamaState:
    """Rebuild the LlamaState from the header layout and a `section(name) -> bytes` accessor.
    `limit` bounds every allocation (the raw size the header states)."""
    meta = meta_pipeline()
    dims = layout.get("values") if pipeline.values_path else None
    if pipeline.values_path and not isinstance(dims, dict):
        raise FormatError("the file's lossy pipeline has no value layout in its header")
    try:
        caches = []
        for ci, c in enumerate(layout["caches"]):
            streams = []
            for si, s in enumerate(c["streams"]):
                if s is None:
                    streams.append(None)
                    continue
                name = f"cells.{ci}.{si}"
                cell_bytes = meta.decode(np.frombuffer(section(name), np.uint8), _meta_info(name, int(s["cell_bytes"])))
                cells = _cells_from_bytes(cell_bytes, int(s["n_cells"]), bool(layout["has_cell_ext"]))
                layers = []
                v_trans = bool(s["v_trans"])
                for li, L in enumerate(s["layers"]):
                    arrays = []
                    for kind in ("k", "v"):
                        name = f"{kind}.{ci}.{si}.{li}"
                        t = ggml_type_by_name(L[f"{kind}_type"])
                        rows, cols = _shape(L[f"{kind}_shape"], name, limit)
                        if dims:
                            n_embd = rows if (kind == "v" and v_trans) else cols // t.type_size * t.block_size
                            info = _tensor_info(name, kind, t, rows * cols, cells, L["model_layer"],
                                                bool(L["sliding_window"]), n_embd, dims)
                            if info.n_cells * n_embd > limit:
                                raise FormatError(f"section {name!r}: shape larger than the state")
                            info = _absorbed_rotation(pipeline, info, t, dims)
                            values = pipeline.decode_values(np.frombuffer(section(name), np.uint8), info)
                            arrays.append((t, _llama_rotation(values, t, info, dims)))
                            continue
                        info = TensorInfo(name, t.name, t.float_bytes, rows * cols)
                        data = pipeline.decode(np.frombuffer(section(name), np.uint8), info)
                        if data.size != rows * cols:
                            raise FormatError(f"section {name!r} decodes to {data.size} bytes, expected {rows * cols}")
                        arrays.append((t, data.reshape(rows, cols)))
                    (kt, k), (vt, v) = arrays
                    if dims:  # values: back into the rows and layout the context expects
                        layers.append(layer_from_values(li, L["model_layer"], bool(L["sliding_window"]), v_trans, kt, k, vt, v))
                    else:
                        layers.append(LayerKV(li, L["model_layer"], bool(L["sliding_window"]), kt, k, vt, v))
                streams.append(Stream(cells, bool(s["v_trans"]), layers))
            caches.append(Cache(c["name"], streams))
        return LlamaState(layout["kind"], caches, layout["arch"], layout["seq_id"], bool(layout["has_cell_ext"]))
    except FormatError:
        raise
    except (KeyError, TypeError, ValueError, StateLayoutError) as e:
        raise FormatError(f"the header's state layout is malformed: {e!r}") from None


def _cells_from_bytes(data: np.ndarray, n: int, has_ext: bool) -> Cells:
    try:
        return parse_cells(data.tobytes(), n, has_ext)
    except StateLayoutError as e:
        raise FormatError(f"cell records: {e}") from None


def encode_tokens(tokens: np.ndarray) -> np.ndarray:
    raw = np.ascontiguousarray(tokens, dtype="<i4").view(np.uint8).reshape(-1)
    return meta_pipeline().encode(raw, _meta_info("tokens", raw.size))


def decode_tokens(data, n_tokens: int) -> np.ndarray:
    if not 0 < n_tokens <= _MAX_TOKENS:
        raise FormatError(f"implausible token count {n_tokens}")
    raw = meta_pipeline().decode(np.frombuffer(data, np.uint8), _meta_info("tokens", 4 * n_tokens))
    if raw.size != 4 * n_tokens:
        raise FormatError("tokens section does not hold the stated token count")
    return raw.view("<i4").astype(np.int32)


LOGITS_DTYPES = {"f32": "<f4", "f16": "<f2"}


def encode_logits(logits: np.ndarray, dtype: str = "f32") -> np.ndarray:
    raw = np.ascontiguousarray(logits, dtype=LOGITS_DTYPES[dtype]).view(np.uint8).reshape(-1)
    return meta_pipeline().encode(raw, _meta_info("logits", raw.size))


def decode_logits(data, n_vocab: int, dtype: str = "f32") -> np.ndarray:
    if dtype not in LOGITS_DTYPES:
        raise FormatError(f"unknown logits dtype {dtype!r}")
    width = np.dtype(LOGITS_DTYPES[dtype]).itemsize
    raw = meta_pipeline().decode(np.frombuffer(data, np.uint8), _meta_info("logits", width * n_vocab))
    if raw.size != width * n_vocab:
        raise FormatError("logits section does not hold one row of the vocabulary")
    return raw.view(LOGITS_DTYPES[dtype]).astype(np.float32)
