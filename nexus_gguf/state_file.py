"""What the sections of a .nxkv file hold: a LlamaState, its prompt tokens and last logits
turned into named sections plus the header's "state" layout, and back."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import FormatError, StateLayoutError
from .ggml_types import ggml_type_by_name
from .llama_state import Cache, Cells, LayerKV, LlamaState, Stream, parse_cells
from .pipeline import Pipeline, meta_pipeline
from .stages import TensorInfo

_MAX_TOKENS = 1 << 26


def _meta_info(name: str, n_bytes: int) -> TensorInfo:
    return TensorInfo(name, "raw", 0, n_bytes)


def encode_state(state: LlamaState, pipeline: Pipeline) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """(layout for the header, sections) of a parsed state."""
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
                for li, L in enumerate(s["layers"]):
                    arrays = []
                    for kind in ("k", "v"):
                        name = f"{kind}.{ci}.{si}.{li}"
                        t = ggml_type_by_name(L[f"{kind}_type"])
                        rows, cols = _shape(L[f"{kind}_shape"], name, limit)
                        info = TensorInfo(name, t.name, t.float_bytes, rows * cols)
                        data = pipeline.decode(np.frombuffer(section(name), np.uint8), info)
                        if data.size != rows * cols:
                            raise FormatError(f"section {name!r} decodes to {data.size} bytes, expected {rows * cols}")
                        arrays.append((t, data.reshape(rows, cols)))
                    (kt, k), (vt, v) = arrays
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


def encode_logits(logits: np.ndarray) -> np.ndarray:
    raw = np.ascontiguousarray(logits, dtype="<f4").view(np.uint8).reshape(-1)
    return meta_pipeline().encode(raw, _meta_info("logits", raw.size))


def decode_logits(data, n_vocab: int) -> np.ndarray:
    raw = meta_pipeline().decode(np.frombuffer(data, np.uint8), _meta_info("logits", 4 * n_vocab))
    if raw.size != 4 * n_vocab:
        raise FormatError("logits section does not hold one row of the vocabulary")
    return raw.view("<f4").astype(np.float32)
