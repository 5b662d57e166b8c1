"""Golden files (numcodecs' habit): committed inputs and the exact bytes every stage and every
preset encoded them to, so a port or a refactor that changes one encoded byte, or the way an old
file decodes, fails a test that names the case.

Shared by tests/test_golden.py (which needs no llama.cpp) and tools/make_fixtures.py (which writes
the fixtures, by decision only: a changed fixture is a format change).

    tests/fixtures/v<N>/manifest.json   the cases: stage configs, tensor infos, hashes
    tests/fixtures/v<N>/stages/*.npz    per stage case: input arrays and encoded output
    tests/fixtures/v<N>/files/*.nxkv    complete files written by the version's writer
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from typing import Any, Optional

import numpy as np

from nexus_gguf.format import NxkvFile
from nexus_gguf.header import Header
from nexus_gguf.llama_state import parse_state, write_state
from nexus_gguf.stages import TensorInfo, stage_from_config
from nexus_gguf.state_file import decode_logits, decode_state, decode_tokens, encode_logits, encode_state, encode_tokens

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def sha256(data) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else data).hexdigest()


def version_dir(version: int) -> str:
    return os.path.join(FIXTURES, f"v{version}")


def load_manifest(version: int) -> dict[str, Any]:
    with open(os.path.join(version_dir(version), "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------- stage cases


_INFO_ARRAYS = ("positions", "importance", "query_energy")  # TensorInfo fields stored in the case's npz


def info_to_json(info: TensorInfo) -> dict[str, Any]:
    d = asdict(info)
    for name in _INFO_ARRAYS:
        d.pop(name)
    return d


def info_from_json(d: dict[str, Any], arrays: dict) -> TensorInfo:
    return TensorInfo(**d, **{name: arrays.get(name) for name in _INFO_ARRAYS})


def _pack(prefix: str, value) -> dict[str, np.ndarray]:
    """A stage's input or output (an array, or a dict of named arrays) as npz entries."""
    if isinstance(value, dict):
        return {f"{prefix}.{name}": np.asarray(v) for name, v in value.items()}
    return {prefix: np.asarray(value)}


def _unpack(npz, prefix: str):
    if prefix in npz.files:
        return npz[prefix]
    names = [k for k in npz.files if k.startswith(prefix + ".")]
    if not names:
        raise KeyError(prefix)
    # npz keeps insertion order; streams are coded in their dict order, so keep it
    return {k[len(prefix) + 1 :]: npz[k] for k in names}


def run_stages(configs, value, info: TensorInfo, direction: str):
    stages = [stage_from_config(c) for c in configs]
    if direction == "encode":
        for s in stages:
            value = s.encode(value, info)
    else:
        for s in reversed(stages):
            value = s.decode(value, info)
    return value


def write_stage_case(version: int, case: dict[str, Any], inputs, info: TensorInfo) -> dict[str, Any]:
    """Encode `inputs` with the case's stages, decode the result, store all of it; returns the
    manifest entry."""
    encoded = run_stages(case["stages"], inputs, info, "encode")
    decoded = run_stages(case["stages"], encoded, info, "decode")
    path = os.path.join(version_dir(version), "stages", case["case"] + ".npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {**_pack("input", inputs), **_pack("encoded", encoded), **_pack("decoded", decoded)}
    for name in _INFO_ARRAYS:
        if getattr(info, name) is not None:
            arrays[name] = np.asarray(getattr(info, name))
    np.savez_compressed(path, **arrays)
    return {**case, "info": info_to_json(info), "data": os.path.relpath(path, version_dir(version))}


def load_stage_case(version: int, entry: dict[str, Any]):
    """(inputs, expected encoded, expected decoded, info) of a stored stage case."""
    npz = np.load(os.path.join(version_dir(version), entry["data"]))
    info = info_from_json(entry["info"], {name: npz[name] for name in _INFO_ARRAYS if name in npz.files})
    return _unpack(npz, "input"), _unpack(npz, "encoded"), _unpack(npz, "decoded"), info


def same(got, want, exact: bool = True) -> str:
    """'' if got equals want (arrays or dicts of arrays, dtype and shape included), else why not."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or list(got) != list(want):
            return f"streams {list(got) if isinstance(got, dict) else type(got).__name__} != {list(want)}"
        for name in want:
            why = same(got[name], want[name], exact)
            if why:
                return f"stream {name!r}: {why}"
        return ""
    got, want = np.asarray(got), np.asarray(want)
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"{got.dtype}{got.shape} != {want.dtype}{want.shape}"
    if exact or want.dtype.kind not in "fc":
        if not np.array_equal(got, want):
            diff = np.nonzero((got != want).reshape(-1))[0]
            return f"{diff.size} of {want.size} values differ (first at flat index {diff[0]})"
        return ""
    # float outputs of value stages are not stored in files: equal up to float32 rounding of
    # the platform's libm, which is what a port of them must reproduce
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got.astype(np.float64) - want).max())
    return "" if err <= 1e-6 * scale else f"max difference {err:.3g} at scale {scale:.3g}"


# ---------------------------------------------------------------- complete files


def parsed_streams(how, data: np.ndarray, info: TensorInfo):
    """A section's streams as `how` (an Entropy's streams or _streams_read) parses them, each with
    its rANS table or the error that raises; "refused" where parsing raises. For comparing the
    C parser with the Python readers."""
    from nexus_gguf.errors import FormatError

    def table(s):
        try:
            p = s.rans()
            return p.lo, p.freqs.tolist(), p.lanes, p.chunk, p.lengths.tolist(), bytes(p.body)
        except FormatError as e:
            return str(e)

    try:
        return [(s.name, s.dtype, s.shape, s.n, s.method, bytes(s.payload), table(s) if s.method in (1, 3) else None)
                for s in how(data, info)]
    except FormatError:
        return "refused"


def table_streams(table) -> list:
    """A StreamTable's streams as parsed_streams lists them, each rANS table read from the
    table's arrays (what section_decode registers) where its row says it parsed."""
    from nexus_gguf.stages import entropy as e

    out = []
    for i, name in enumerate(table.names):
        r = table.records[i].tolist()
        rans = None
        if r[e.REC_RANS_OK]:
            body = table.payload[r[e.REC_BODY_AT] : r[e.REC_BODY_AT] + r[e.REC_BODY_SIZE]]
            rans = (r[e.REC_LO], table.values[r[e.REC_FREQ0] : r[e.REC_FREQ0] + r[e.REC_N_FREQS]].tolist(), r[e.REC_LANES],
                    r[e.REC_CHUNK], table.values[r[e.REC_LENGTH0] : r[e.REC_LENGTH0] + r[e.REC_N_LENGTHS]].tolist(), bytes(body))
        out.append((name, r[e.REC_DTYPE], table.shape(i), r[e.REC_N], r[e.REC_METHOD], rans))
    return out


def decode_file(path: str) -> dict[str, Any]:
    """Everything load_state would hand to llama.cpp, decoded without a model (sizes bounded by
    the model record in the file's header): the rebuilt state blob, the prompt tokens and the
    saved logits row."""
    f = NxkvFile.open(path)
    try:
        f.verify()
        h = Header(f.header, path)
        limits = h.limits()
        state = decode_state(h.state, h.pipeline, f.section, limits)
        tokens = decode_tokens(f.section("tokens"), h.n_tokens, limits)
        logits = None
        if h.logits is not None:
            logits = decode_logits(f.section("logits"), h.logits["n_vocab"], h.logits["dtype"], limits)
    except BaseException:
        f.close()  # a fuzz run decodes thousands of damaged files: none may hold its descriptor
        raise
    return {"file": f, "header": h, "blob": write_state(state), "tokens": tokens, "logits": logits}


def reencode_file(path: str, raw_blob: bytes, importance: Optional[np.ndarray] = None,
                  queries: Optional[dict] = None) -> dict[str, bytes]:
    """The sections today's writer makes of `raw_blob` (the state the file was saved from) with
    the file's own stages and options, as {name: bytes}. Cells an evicting preset dropped are
    dropped again: the file's cell records say which it kept. `importance`: the scores the file
    was written with (per cell of the raw state), for stages that code cells by importance;
    `queries`: the query energy per model layer, for K weighted by the queries."""
    d = decode_file(path)
    h = d["header"]
    state = parse_state(raw_blob, h.state["kind"], _layout_of(h.state))
    if h.eviction is not None:  # keep the positions the file kept
        kept = parse_state(d["blob"], h.state["kind"], _layout_of(h.state))
        state, idx = keep_positions(state, kept)
        importance = None if importance is None else importance[idx]
    layout, sections = encode_state(state, h.pipeline, h.state.get("values"), importance, queries=queries)
    out = {"tokens": encode_tokens(d["tokens"])}
    if d["logits"] is not None:
        out["logits"] = encode_logits(d["logits"], h.logits["dtype"])
    out.update(sections)
    return {name: bytes(np.ascontiguousarray(v).tobytes()) for name, v in out.items()}


def _layout_of(state_layout: dict[str, Any]):
    from nexus_gguf.llama_state import StateLayout

    caches = state_layout["caches"]
    first_stream = [next(st for st in c["streams"] if st) for c in caches]
    return StateLayout(
        bool(state_layout["has_cell_ext"]),
        [[L["model_layer"] for L in st["layers"]] for st in first_stream],
        [bool(st["layers"][0]["sliding_window"]) for st in first_stream],
    )


def load_scores(vdir: str, entry: dict) -> tuple[Optional[np.ndarray], Optional[dict]]:
    """(importance, query energy per model layer) a file entry was written with, where stored."""
    importance = np.load(os.path.join(vdir, entry["importance"])) if entry.get("importance") else None
    queries = None
    if entry.get("queries"):
        npz = np.load(os.path.join(vdir, entry["queries"]))
        queries = {int(k): npz[k] for k in npz.files}
    return importance, queries


def keep_positions(state, kept):
    """(`state` with, in its first cache, only the cells whose positions `kept` has there; their
    indices)."""
    full = next(s for s in state.caches[0].streams if s is not None).cells.pos
    want = next(s for s in kept.caches[0].streams if s is not None).cells.pos
    idx = np.nonzero(np.isin(full, want))[0]
    return state.keep_cells(idx), idx
