"""The GPU decode of lattice-coded K/V sections (section_decode.py, native/cuda/nxkv_cuda.cu): the
rows it writes are the CPU path's, bit for bit, for the golden files and for option variants
re-encoded from them. Each case runs twice: through the numpy reference of the batched kernel
(section_decode.reference_decode: tests the batch the host builds, on any machine), and through the
CUDA library where a GPU answers (skipped with the reason elsewhere; tools/gpu_check.sh runs it).
The per-op CUDA kernels are compared with their references in test_backends.py."""

from __future__ import annotations

import dataclasses

import os

import numpy as np
import pytest

import golden
from nexus_gguf import section_decode, state_file
from nexus_gguf.backends import backend_status
from nexus_gguf.errors import FormatError
from nexus_gguf.format import NxkvFile
from nexus_gguf.header import Header
from nexus_gguf.llama_state import parse_state
from nexus_gguf.pipeline import PRESETS, Pipeline
from nexus_gguf.state_file import decode_state_blob, encode_state

FILES = os.path.join(golden.FIXTURES, "v1", "files")
V2 = "../../v2/files/"  # format 2 (PCA basis, component classes, head groups), relative to FILES
GPU_FILES = ["gemma3-high.nxkv", "gemma3-balanced.nxkv", "gemma3-max.nxkv", "gemma3-high-0.1.0.nxkv",
             "gemma3-high-0.1.0-2.nxkv", "gemma3-max-0.1.0-2.nxkv", "smollm2-f16-vtrans-high.nxkv",
             "smollm2-f16-vtrans-high-0.1.0.nxkv", "smollm2-f16-vtrans-high-0.1.0-2.nxkv", V2 + "gemma3-high.nxkv",
             V2 + "gemma3-balanced.nxkv", V2 + "gemma3-max.nxkv", V2 + "gemma3-long-high.nxkv",
             V2 + "smollm2-f16-vtrans-high.nxkv",
             V2 + "gemma3-long-high-0.1.0-3.nxkv"]  # importance-aware steps: a column table per step bucket


def _reference(pipeline, work):
    section_decode.reference_decode(section_decode.prepare(pipeline, work))


DECODERS = {"reference": _reference, "cuda": section_decode.decode_sections}


def _decoder(name: str):
    if name.startswith("cuda") and backend_status()["cuda"] != "available":
        pytest.skip(f"cuda backend {backend_status()['cuda']}")
    return DECODERS[name]


def _open(path: str):
    f = NxkvFile.open(path)
    h = Header(f.header, path)
    return f, h


def _decode(monkeypatch, decoder, pipeline, layout, section, limits) -> tuple[bytes, int]:
    """(the blob decode_state_blob makes with `decoder` as the GPU path, sections it decoded)."""
    calls = []

    def counted(p, work):
        calls.append(len(work))
        decoder(p, work)

    with monkeypatch.context() as m:
        m.setattr(state_file, "_gpu_decoder", lambda: counted)
        blob, _ = decode_state_blob(layout, pipeline, section, limits)
    return bytes(blob), sum(calls)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("name", GPU_FILES)
def test_gpu_decode_of_golden_files_matches_the_cpu(monkeypatch, name, decoder):
    f, h = _open(os.path.normpath(os.path.join(FILES, name)))
    want, _ = decode_state_blob(h.state, h.pipeline, f.section, h.limits())
    got, n = _decode(monkeypatch, _decoder(decoder), h.pipeline, h.state, f.section, h.limits())
    assert n > 0 and got == bytes(want)


def _variant(source: str, high: str, edit, queries: bool = False) -> tuple:
    """(pipeline, layout, sections, limits): the lossless file's state re-encoded with the high
    file's (bound) stages as `edit` changes their configs (id -> config; it may drop a stage),
    with made-up query energies (lognormal per RoPE pair) where `queries`, and made-up cell
    importance where the lattice takes steps from it."""
    f, h = _open(os.path.join(FILES, source))
    fh, hh = _open(os.path.join(FILES, high))
    blob, _ = decode_state_blob(h.state, h.pipeline, f.section, h.limits())
    state = parse_state(bytes(blob), h.state["kind"], golden._layout_of(h.state))
    configs = {c["id"]: dict(c) for c in hh.pipeline.get_config()["stages"]}
    edit(configs)
    pipeline = Pipeline.from_config({"stages": list(configs.values())})
    energy = None
    if queries:
        rng = np.random.default_rng(3)
        d, n_kv = hh.state["values"]["head_dim_k"], hh.raw_header["model"]["n_head_kv"]
        energy = {L["model_layer"]: np.repeat(rng.lognormal(0.0, 2.0, (n_kv, d // 2)), 2, axis=1)
                  for c in hh.state["caches"] for st in c["streams"] if st for L in st["layers"]}
    importance = None
    if configs["lattice"].get("token_steps"):
        # made-up attention: three step buckets, the finest's cells (the sinks among them) not all
        # adjacent, so a tile of eight of its rows is eight scattered cells, and short buckets
        i = np.arange(len(state.caches[0].streams[0].cells))
        importance = np.where(i % 6 == 4, 1 / 16, np.where(i % 6 == 1, 1 / 64, 1.0))
    layout, sections = encode_state(state, pipeline, hh.state["values"], importance=importance, queries=energy)
    data = {name: bytes(np.ascontiguousarray(v).tobytes()) for name, v in sections}
    return pipeline, layout, data.__getitem__, hh.limits()


VARIANTS = {
    "chunked-lanes": lambda c: c["entropy"].update(lanes=8, chunk=64),
    "one-lane": lambda c: c["entropy"].update(lanes=1, chunk=0),
    "zstd-coder": lambda c: c["entropy"].update(coder="zstd"),
    "vector-scales": lambda c: c["lattice"].update(scale_scope="vector", scale_block=16),
    "max-scales-f16": lambda c: c["lattice"].update(scale_scope="vector", scale_stat="max", scale_format="f16"),
    "no-centre-no-sinks": lambda c: c["lattice"].update(center=False, sinks=0),
    "all-sinks": lambda c: c["lattice"].update(sinks=1 << 20),
    "values-not-rotated": lambda c: c["hadamard"].update(values=False),
    "rope-neox-partial": lambda c: c["rope"].update(mode="neox", n_rot=16),
}


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("source,high", [("smollm2-f16-vtrans-lossless.nxkv", "smollm2-f16-vtrans-high.nxkv"),
                                         ("gemma3-lossless.nxkv", "gemma3-high.nxkv")])
def test_gpu_decode_of_option_variants_matches_the_cpu(monkeypatch, source, high, variant, decoder):
    pipeline, layout, section, limits = _variant(source, high, VARIANTS[variant])
    want, _ = decode_state_blob(layout, pipeline, section, limits)
    got, n = _decode(monkeypatch, _decoder(decoder), pipeline, layout, section, limits)
    assert n > 0 and got == bytes(want)


@pytest.mark.parametrize("name,why", [("smollm2-q8_0-high.nxkv", "q8_0"), ("gemma3-seed.nxkv", "delta"),
                                      (V2 + "smollm2-q8_0-high.nxkv", "q8_0")])
def test_files_the_gpu_does_not_decode_say_why_and_use_the_cpu(monkeypatch, name, why):
    f, h = _open(os.path.normpath(os.path.join(FILES, name)))
    types = {L[f"{p}_type"] for c in h.state["caches"] for s in c["streams"] if s for L in s["layers"] for p in "kv"}
    assert why in section_decode.unsupported(h.pipeline, h.state["values"], types)
    want, _ = decode_state_blob(h.state, h.pipeline, f.section, h.limits())
    got, n = _decode(monkeypatch, _reference, h.pipeline, h.state, f.section, h.limits())
    assert n == 0 and got == bytes(want)


def _prepared(name: str = "smollm2-f16-vtrans-high.nxkv"):
    """A prepared batch of the file's sections, with fresh rows to write into."""
    f, h = _open(os.path.join(FILES, name))
    captured = []

    def capture(p, work):
        captured.append(section_decode.prepare(p, work))

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as m:
        m.setattr(state_file, "_gpu_decoder", lambda: capture)
        decode_state_blob(h.state, h.pipeline, f.section, h.limits())
    return captured[0]


def _runner(decoder: str):
    _decoder(decoder)
    return section_decode.reference_decode if decoder == "reference" else section_decode.run


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_damaged_lane_is_a_format_error_and_writes_no_rows(decoder):
    run = _runner(decoder)
    prep = _prepared()
    for job in prep.jobs:
        job.rows[...] = 0xAB
    prep.arrays["payload"] = prep.arrays["payload"].copy()
    prep.arrays["payload"][len(prep.arrays["payload"]) // 2] ^= 0x5A
    with pytest.raises(FormatError, match="rANS stream is corrupt|not finite|coset"):
        run(prep)
    assert all((job.rows == 0xAB).all() for job in prep.jobs)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_values_that_are_not_finite_are_refused(decoder):
    run = _runner(decoder)
    prep = _prepared()
    prep.arrays["steps"] = prep.arrays["steps"].copy()
    prep.arrays["steps"][prep.sections[3]["step0"]] = np.inf
    with pytest.raises(FormatError, match=f"section '{prep.jobs[3].info.name}' decodes to values that are not finite"):
        run(prep)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_coset_symbols_other_than_0_and_1_are_refused(decoder):
    run = _runner(decoder)
    prep = _prepared()
    prep.sections[5]["coset_lo"] += 2
    with pytest.raises(FormatError, match=f"{prep.jobs[5].info.name}: lattice coset symbols must be 0 or 1"):
        run(prep)


def test_cuda_backend_reports_why_it_is_unavailable_or_names_its_device():
    status = backend_status()["cuda"]
    if status == "available":
        from nexus_gguf.backends import cuda

        name, major, minor = cuda.device()
        assert name and major >= 5
    else:
        assert status.startswith("unavailable: ") and len(status) > len("unavailable: ") + 10


# ---------------------------------------------------------------- encode


def _encode_both(monkeypatch, source: str, high: str, edit, engine: str):
    """(the CPU writer's sections, the GPU path's sections, how many the GPU path made)."""
    from functools import partial

    from nexus_gguf import cuda_encode

    if engine == "cuda" and backend_status()["cuda"] != "available":
        pytest.skip(f"cuda backend {backend_status()['cuda']}")
    f, h = _open(os.path.join(FILES, source))
    _, hh = _open(os.path.join(FILES, high))
    blob, _ = decode_state_blob(h.state, h.pipeline, f.section, h.limits())
    state = parse_state(bytes(blob), h.state["kind"], golden._layout_of(h.state))
    configs = [dict(c) for c in hh.pipeline.get_config()["stages"]]
    edit({c["id"]: c for c in configs})
    pipeline = Pipeline.from_config({"stages": configs})
    dims = hh.state["values"]
    _, cpu = encode_state(state, pipeline, dims)
    made = []

    def counted(p, jobs):
        made.append(len(jobs))
        run = cuda_encode.encode_sections if engine == "cuda" else partial(cuda_encode.encode_sections,
                                                                          engine=cuda_encode._ReferenceEngine())
        return run(p, jobs)

    with monkeypatch.context() as m:
        m.setattr(state_file, "_gpu_encoder", lambda: counted)
        _, gpu = encode_state(state, pipeline, dims)
    return cpu, gpu, sum(made)


ENCODE_VARIANTS = {
    "preset": lambda c: c["entropy"].update(next(s for s in PRESETS["high"]["stages"] if s["id"] == "entropy")),
    "chunked-lanes": lambda c: c["entropy"].update(lanes=8, chunk=64),
    "one-plain-stream": lambda c: c["entropy"].update(lanes=1, chunk=0),
    "no-centre-no-sinks": lambda c: c["lattice"].update(center=False, sinks=0),
    "all-sinks": lambda c: c["lattice"].update(sinks=1 << 20),
    "values-not-rotated": lambda c: c["hadamard"].update(values=False),
    "rope-neox-partial": lambda c: c["rope"].update(mode="neox", n_rot=16),
    "wide-coordinates": lambda c: c["lattice"].update(k_bits=12.0, v_bits=12.0),  # alphabets past rANS: zstd
}


@pytest.mark.parametrize("engine", ["reference", "cuda"])
@pytest.mark.parametrize("variant", sorted(ENCODE_VARIANTS))
@pytest.mark.parametrize("source,high", [("smollm2-f16-vtrans-lossless.nxkv", "smollm2-f16-vtrans-high.nxkv"),
                                         ("gemma3-lossless.nxkv", "gemma3-high.nxkv")])
def test_gpu_encode_writes_the_cpu_writers_bytes(monkeypatch, source, high, variant, engine):
    cpu, gpu, n = _encode_both(monkeypatch, source, high, ENCODE_VARIANTS[variant], engine)
    assert n > 0
    assert [name for name, _ in gpu] == [name for name, _ in cpu]
    for (name, want), (_, got) in zip(cpu, gpu):
        assert bytes(np.asarray(got)) == bytes(np.asarray(want)), name


@pytest.mark.parametrize("edit,why", [
    (lambda c: c["entropy"].update(coder="zstd"), "zstd"),
    (lambda c: c["lattice"].update(scale_scope="vector", scale_block=16), "per head"),
    (lambda c: c["lattice"].update(token_steps=0.5), "importance"),
    (lambda c: c["lattice"].update(rdo=0.05), "rate-distortion"),
    # format 2's high
    (lambda c: (c.pop("hadamard"), c["lattice"].update(next(s for s in PRESETS["high"]["stages"] if s["id"] == "lattice"))),
     "encoded on the CPU (the GPU decodes them)"),
])
def test_sections_the_gpu_does_not_encode_say_why_and_use_the_cpu(monkeypatch, edit, why):
    from nexus_gguf import cuda_encode

    _, hh = _open(os.path.join(FILES, "smollm2-f16-vtrans-high.nxkv"))
    configs = [dict(c) for c in hh.pipeline.get_config()["stages"]]
    by_id = {c["id"]: c for c in configs}
    edit(by_id)
    pipeline = Pipeline.from_config({"stages": list(by_id.values())})
    assert why in cuda_encode.unsupported(pipeline, hh.state["values"], {"f16"})
    assert "q8_0" in cuda_encode.unsupported(hh.pipeline, hh.state["values"], {"f16", "q8_0"})


def test_every_library_function_the_python_side_calls_is_declared():
    """The GPU paths run only where a GPU is: a misspelt library call would first fail there. Every
    `lib.nxkv_...` the Python side calls must be declared in the headers cffi reads."""
    import re
    from pathlib import Path

    import cffi

    from nexus_gguf.backends import native

    root = Path(native.__file__).resolve().parent.parent
    include = root.parent / "native" / "include"
    if not include.is_dir():
        pytest.skip("no native/ sources (an installed package's tests)")
    declarations = native._cdef(include / "nxkv.h") + native._cdef(include / "nxkv_cuda.h", "NXKV_CUDA_CDEF")
    cffi.FFI().cdef(declarations)  # what backends/cuda.py parses
    declared = set(re.findall(r"\b(nxkv_\w+)\s*\(", declarations))
    called = set()
    for source in ("backends/native.py", "backends/cuda.py", "section_decode.py", "cuda_encode.py", "llama_capture.py"):
        path = root / source
        if path.exists():
            called |= set(re.findall(r"\blib\.(nxkv_\w+)", path.read_text()))
    assert called and called <= declared, sorted(called - declared)


PCA_VARIANTS = {
    "pca-classes": lambda c: (c.pop("hadamard", None), c["lattice"].update(transform="pca", classes=True, pca_min_cells=1)),
    "pca": lambda c: (c.pop("hadamard", None), c["lattice"].update(transform="pca", pca_min_cells=1)),
    "classes-hadamard": lambda c: c["lattice"].update(classes=True),
    "pca-classes-no-centre": lambda c: (c.pop("hadamard", None),
                                        c["lattice"].update(transform="pca", classes=True, pca_min_cells=1, center=False, sinks=0)),
    "pca-classes-zstd": lambda c: (c.pop("hadamard", None),
                                   c["lattice"].update(transform="pca", classes=True, pca_min_cells=1), c["entropy"].update(coder="zstd")),
    "pca-k-weights": lambda c: (c.pop("hadamard", None),
                                c["lattice"].update(transform="pca", classes=True, pca_min_cells=1, k_weights="queries")),
    "pca-head-group": lambda c: (c.pop("hadamard", None),
                                 c["lattice"].update(transform="pca", classes=True, pca_min_cells=1, head_group=0, basis_bits=8)),
    "pca-head-group-k-weights": lambda c: (c.pop("hadamard", None),
                                           c["lattice"].update(transform="pca", pca_min_cells=1, head_group=0, k_weights="queries")),
    "head-group-hadamard": lambda c: c["lattice"].update(head_group=3),
    # importance-aware steps: a column table per step bucket, a cell map
    "pca-classes-buckets": lambda c: (c.pop("hadamard", None), c["lattice"].update(transform="pca", classes=True, pca_min_cells=1,
                                                                                     token_steps=0.5, step_octaves=3.0)),
    "pca-head-group-buckets": lambda c: (c.pop("hadamard", None), c["lattice"].update(transform="pca", pca_min_cells=1, head_group=0,
                                                                                        k_weights="queries", token_steps=0.7)),
    "hadamard-buckets": lambda c: c["lattice"].update(token_steps=0.5, step_octaves=3.0),
    "vector-scales-buckets": lambda c: c["lattice"].update(scale_scope="vector", scale_block=16, token_steps=0.5),
}


@pytest.mark.parametrize("decoder", ["reference", "native", "cuda"])
@pytest.mark.parametrize("variant", sorted(PCA_VARIANTS))
@pytest.mark.parametrize("source,high", [("smollm2-f16-vtrans-lossless.nxkv", "smollm2-f16-vtrans-high.nxkv"),
                                         ("gemma3-lossless.nxkv", "gemma3-high.nxkv")])
def test_batch_of_pca_and_classes_matches_the_stages(monkeypatch, source, high, variant, decoder):
    """The lattice's PCA transform, component classes and head groups decode through the batch
    (core/section.h: basis, per-class symbol columns; on the GPU a tile of cells a block) to the
    stage-by-stage rows, bit for bit, on the CPU library and the GPU."""
    if decoder != "reference" and backend_status()[decoder] != "available":
        pytest.skip(f"{decoder} backend {backend_status()[decoder]}")
    pipeline, layout, section, limits = _variant(source, high, PCA_VARIANTS[variant], queries=True)
    types = {L[f"{p}_type"] for c in layout["caches"] for s in c["streams"] if s for L in s["layers"] for p in "kv"}
    assert section_decode.unsupported(pipeline, layout["values"], types) is None
    with monkeypatch.context() as m:
        m.setattr(state_file, "_native_batches", lambda: False)  # stage by stage
        want, _ = decode_state_blob(layout, pipeline, section, limits)
    if decoder == "cuda":
        got, n = _decode(monkeypatch, section_decode.decode_sections, pipeline, layout, section, limits)
        assert n > 0 and got == bytes(want)
        return
    calls = []

    def batch(prep):
        calls.append(prep)
        (section_decode.reference_decode if decoder == "reference" else run_native)(prep)

    run_native = section_decode.run_native
    with monkeypatch.context() as m:
        m.setattr(state_file, "_native_batches", lambda: True)
        m.setattr(section_decode, "run_native", batch)
        got, _ = decode_state_blob(layout, pipeline, section, limits)
    assert calls and bytes(got) == bytes(want)
    if "pca" in variant:
        assert any(s["basis"] for prep in calls for s in prep.sections)
    if "classes" in variant:
        assert all(s["by_class"] for prep in calls for s in prep.sections)
    if "weights" in variant:
        assert any(s["cscale0"] >= 0 for prep in calls for s in prep.sections)
    if "group" in variant and source.startswith("smollm2"):  # 3 KV heads (the tiny Gemma 3 has 1)
        assert all(s["head_group"] == 3 for prep in calls for s in prep.sections)
    if "buckets" in variant:  # the first cache's sections (the tiny Gemma 3's sliding one has none)
        assert any(s["cell_map0"] >= 0 and s["n_tables"] > 2 for prep in calls for s in prep.sections)


LEVEL_VARIANTS = {
    "pca-head-group": PCA_VARIANTS["pca-head-group"],
    # weak components left out: their basis rows stored as zeros, which the tiles' products skip
    "pca-pruned": lambda c: (c.pop("hadamard", None), c["lattice"].update(transform="pca", classes=True, pca_min_cells=1,
                                                                            head_group=0, basis_bits=8, basis_prune=0.5)),
    "pca-classes-no-centre": PCA_VARIANTS["pca-classes-no-centre"],
    "pca-k-weights": PCA_VARIANTS["pca-k-weights"],
    # a 9-bit basis has entries past int8: its products take int16 pairs
    "pca-basis-9-bits": lambda c: (c.pop("hadamard", None), c["lattice"].update(transform="pca", pca_min_cells=1, basis_bits=9)),
    # points decoded on the host (zstd), some then moved past int16 (below): those vectors take
    # the float / int64 products inside a tile
    "pca-wide-coordinates": lambda c: (c.pop("hadamard", None), c["lattice"].update(transform="pca", pca_min_cells=1),
                                       c["entropy"].update(coder="zstd")),
    # as above with coordinates near 2^30 and the bases read as 15-bit ones: sums past 2^52,
    # which the GPU makes in int64 instead of doubles
    "pca-huge-coordinates": lambda c: (c.pop("hadamard", None), c["lattice"].update(transform="pca", pca_min_cells=1, head_group=0),
                                       c["entropy"].update(coder="zstd")),
    # tiles of one step bucket's cells (not adjacent in the rows) and the cells left at its ends
    "pca-classes-buckets": PCA_VARIANTS["pca-classes-buckets"],
    "pca-head-group-buckets": PCA_VARIANTS["pca-head-group-buckets"],
}


def _level_batches(monkeypatch, variant: str, defer_basis: bool = True) -> list:
    """Prepared batches of the SmolLM2 state re-encoded as LEVEL_VARIANTS[variant] says, with the
    damage the wide and huge variants describe; their bases decoded with the point streams (the
    CPU library's way) or on the host (the GPU's)."""
    pipeline, layout, section, limits = _variant("smollm2-f16-vtrans-lossless.nxkv", "smollm2-f16-vtrans-high.nxkv",
                                                 LEVEL_VARIANTS[variant], queries=True)
    preps = []
    prepare = section_decode.prepare
    with monkeypatch.context() as m:
        m.setattr(state_file, "_native_batches", lambda: True)
        m.setattr(section_decode, "prepare", lambda p, work, defer_basis_=None, **_: prepare(p, work, defer_basis=defer_basis))
        m.setattr(section_decode, "run_native", lambda prep: (preps.append(prep), section_decode.reference_decode(prep)))
        decode_state_blob(layout, pipeline, section, limits)
    assert preps and any(s["basis"] for prep in preps for s in prep.sections)
    rans_coded = variant not in ("pca-wide-coordinates", "pca-huge-coordinates")  # the others' streams are rANS
    assert any(prep.deferred_bases for prep in preps) == (defer_basis and rans_coded)
    if variant in ("pca-wide-coordinates", "pca-huge-coordinates"):  # what only a damaged file holds
        for prep in preps:
            host = prep.arrays["host_symbols"] = prep.arrays["host_symbols"].copy()
            for sec in prep.sections:  # coordinates (not cosets) on the host
                start = sec["coord0"] - prep.host_symbols0
                assert not sec["by_class"] and start >= 0
                coords = host[start : start + 7 * sec["n_cells"] * sec["n_heads"] * sec["head_dim"] // 8]
                if variant == "pca-wide-coordinates":
                    coords[::97] += 40000
                else:  # every coordinate of the first 5 cells of 8 (the last tile short), the rest as coded
                    per_cell = 7 * sec["n_heads"] * sec["head_dim"] // 8
                    cells = coords.reshape(sec["n_cells"], per_cell)
                    cells[np.arange(sec["n_cells"]) % 8 < 5] = (1 << 30) - 1
                    sec["basis_shift"] = 14
    return preps


def _laid_out(prep, out_f16: int, transposed: int):
    """The batch writing into fresh rows as f16 or f32, cell-major or transposed."""
    jobs = [dataclasses.replace(j, out_f16=bool(out_f16), transposed=bool(transposed),
                                rows=np.zeros(j.info.n_cells * j.info.n_heads * j.info.head_dim * (2 if out_f16 else 4), np.uint8))
            for j in prep.jobs]
    return dataclasses.replace(prep, jobs=jobs, sections=[{**s, "out_f16": out_f16, "transposed": transposed} for s in prep.sections])


LAYOUTS = ((1, 0), (1, 1), (0, 0), (0, 1))


@pytest.mark.parametrize("variant", sorted(LEVEL_VARIANTS))
def test_cpu_library_rows_match_the_reference_at_every_extension_level(monkeypatch, variant):
    """nxkv_decode_values at each level of CPU extensions (0: portable code, 1: AVX2 and F16C,
    2: AVX-512, a basis section's cells eight at a time with VNNI products, int8 where the tile's
    points and the basis fit, else int16) writes the numpy reference's rows, as f16 and f32,
    cell-major and transposed."""
    if backend_status()["native"] != "available":
        pytest.skip(f"native backend {backend_status()['native']}")
    from nexus_gguf.backends import native

    preps = _level_batches(monkeypatch, variant)
    _, lib = native.load()
    was = lib.nxkv_use_cpu_extensions(2)
    try:
        for prep in preps[:3]:
            for out_f16, transposed in LAYOUTS:
                want = _laid_out(prep, out_f16, transposed)
                section_decode.reference_decode(want)
                for level in (2, 1, 0):
                    lib.nxkv_use_cpu_extensions(level)
                    got = _laid_out(prep, out_f16, transposed)
                    section_decode.run_native(got)
                    for a, b in zip(want.jobs, got.jobs):
                        assert bytes(a.rows) == bytes(b.rows), f"level {level}, f16 {out_f16}, transposed {transposed}: {a.info.name}"
    finally:
        lib.nxkv_use_cpu_extensions(was)


def test_pruned_variant_has_bases_whose_last_rows_are_zero(monkeypatch):
    """The "pca-pruned" level variant exercises the tiles' skipping of zero basis rows (the
    components basis_prune left out, the weakest last): its bases end in zero rows, not all of
    them a whole number of quads."""
    preps = _level_batches(monkeypatch, "pca-pruned", defer_basis=False)
    tails = []
    for prep in preps:
        for s in prep.sections:
            w, hc = s["head_dim"] * s["head_group"], s["n_heads"] // s["head_group"]
            bases = prep.arrays["bases"][s["basis0"] : s["basis0"] + hc * w * w].reshape(hc, w, w)
            for b in bases:
                nonzero = np.flatnonzero(np.abs(b).sum(axis=1))
                tails.append(w - 1 - (nonzero.max() if nonzero.size else -1))
    assert max(tails) > 0 and any(t % 4 for t in tails), tails


@pytest.mark.parametrize("decoder", ["reference", "native"])
def test_deferred_bases_beyond_their_bits_are_refused(monkeypatch, decoder):
    """A basis decoded with the point streams (the CPU library's batches) is checked as one
    decoded on the host: entries beyond basis_bits are a FormatError naming the section."""
    if decoder == "native" and backend_status()["native"] != "available":
        pytest.skip(f"native backend {backend_status()['native']}")
    prep = _level_batches(monkeypatch, "pca-head-group")[0]
    i, out0, lo, size, dtype, where = prep.deferred_bases[0]
    prep.deferred_bases[0] = (i, out0, lo + 1000, size, dtype, where)
    with pytest.raises(FormatError, match=f"{prep.jobs[i].info.name}: basis entries beyond 8 bits"):
        (section_decode.reference_decode if decoder == "reference" else section_decode.run_native)(prep)


def test_cell_maps_outside_their_tables_are_refused_before_anything_is_written(monkeypatch):
    """The library checks a bucket section's cell map (nxkv_core_section_fits: a table that is
    not there, a row past the table's streams, a map without column tables) before it reads a
    symbol: the batch is refused as inconsistent and no row is written."""
    if backend_status()["native"] != "available":
        pytest.skip(f"native backend {backend_status()['native']}")
    preps = _level_batches(monkeypatch, "pca-classes-buckets")
    prep = next(p for p in preps if p.sections[0]["cell_map0"] >= 0)
    sec = prep.sections[0]
    at = sec["cell_map0"]

    def damaged(edit):
        cols = prep.arrays["columns"].copy()
        s = dict(sec)
        edit(cols, s)
        got = _laid_out(dataclasses.replace(prep, arrays={**prep.arrays, "columns": cols}, sections=[s, *prep.sections[1:]]), 1, 1)
        return got

    for edit in (lambda c, s: c.__setitem__(at, s["n_tables"]),  # cell 0 in a table that is not there
                 lambda c, s: c.__setitem__(at + 1, 10**9),  # its row past every stream
                 lambda c, s: s.update(n_tables=0),
                 lambda c, s: s.update(by_class=0)):  # a cell map without column tables
        got = damaged(edit)
        with pytest.raises(FormatError, match="inconsistent"):
            section_decode.run_native(got)
        assert not any(job.rows.any() for job in got.jobs)


def _same_batch(a, b) -> None:
    assert sorted(a.arrays) == sorted(b.arrays)
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)
    np.testing.assert_array_equal(a.streams, b.streams)
    assert (a.stream_names, a.n_symbols, a.host_symbols0, a.deferred_bases) == (b.stream_names, b.n_symbols, b.host_symbols0,
                                                                               b.deferred_bases)
    assert repr(a.sections) == repr(b.sections)


@pytest.mark.parametrize("variant", ["pca-classes-buckets", "pca-head-group-buckets", "pca-pruned", "pca-classes-no-centre",
                                     "pca-wide-coordinates"])
def test_point_plans_made_in_c_and_in_numpy_make_the_same_batch(monkeypatch, variant):
    """nxkv_point_layout (which point stream a cell's row reads where, the step buckets' cell map)
    and its numpy reference (_numpy_point_plan) give byte-identical batches: sections split by
    component class, by step bucket and by both, and plain ones."""
    if section_decode.native_host("point_layout") is None:
        pytest.skip(f"native backend {backend_status()['native']}")
    made = _level_batches(monkeypatch, variant)
    with monkeypatch.context() as m:
        m.setattr(section_decode, "native_host", lambda name: None)
        reference = _level_batches(monkeypatch, variant)
    assert len(made) == len(reference)
    for a, b in zip(made, reference):
        _same_batch(a, b)
    by_column = [s for p in made for s in p.sections if s["by_class"]]
    assert by_column if variant != "pca-wide-coordinates" else not by_column
    if variant.endswith("buckets"):
        assert any(s["n_tables"] > 1 for s in by_column)


def test_a_point_stream_missing_or_misshapen_is_the_numpy_paths_error(monkeypatch):
    """Where a point stream is not there or not of its shape, the C plan gives way and the numpy
    plan names it, as it did alone."""
    from nexus_gguf.stages.entropy import REC_SHAPE, StreamTable

    if section_decode.native_host("point_layout") is None:
        pytest.skip(f"native backend {backend_status()['native']}")
    preps = []
    pipeline, layout, section, limits = _variant("smollm2-f16-vtrans-lossless.nxkv", "smollm2-f16-vtrans-high.nxkv",
                                                 LEVEL_VARIANTS["pca-classes-buckets"], queries=True)
    stages = section_decode.value_stages(pipeline)
    with monkeypatch.context() as m:
        m.setattr(state_file, "_native_batches", lambda: True)
        m.setattr(section_decode, "run_native", lambda prep: None)
        m.setattr(section_decode, "_section", lambda batch, job, st, real=section_decode._section: (preps.append(job), real(batch, job, st)))
        decode_state_blob(layout, pipeline, section, limits)
    job = preps[0]
    table = stages[3].stream_table(np.frombuffer(job.data, np.uint8), job.info)
    point = next(i for i, name in enumerate(table.names) if name.startswith("coord.") and ".c" in name)

    def edited(rename: bool) -> StreamTable:
        names, records = list(table.names), table.records.copy()
        if rename:
            names[point] = names[point].replace(".c", ".x")
        else:
            records[point, REC_SHAPE] += 1
        return StreamTable(table.info, names, records, table.values, table.payload, table.stream)

    for rename in (True, False):
        messages = []
        for numpy_only in (False, True):
            with monkeypatch.context() as m:
                m.setattr(stages[3], "stream_table", lambda data, info: edited(rename))
                if numpy_only:
                    m.setattr(section_decode, "native_host", lambda name: None)
                with pytest.raises(FormatError, match="missing or not of shape") as e:
                    section_decode.prepare(pipeline, [job], defer_basis=True)
                messages.append(str(e.value))
        assert messages[0] == messages[1]


def test_point_stream_roles_are_read_from_names_as_the_encoder_writes_them():
    role = section_decode._parse_point_role
    assert role("coset") == (0, -1, -1) and role("coord.3") == (1, 3, -1) and role("coord_last.c7") == (2, -1, 7)
    assert role("coord.0.c0") == (1, 0, 0) and role("coord.255.c2") == (1, 255, 2)
    for other in ("coords", "coord.03", "coord.c02", "coord.+3", "coord.3.c2.c1", "coord.c2.3", "coord.c8", "coord.256",
                  "coord.", "coord.c", "scale", "coord.٣"):
        assert role(other) == (-1, -1, -1), other


@pytest.mark.parametrize("variant", sorted(LEVEL_VARIANTS))
def test_gpu_rows_of_basis_sections_match_the_reference(monkeypatch, variant):
    """The GPU's basis tiles (k_section_basis: points, exact products in doubles or int64, the
    finish) write the numpy reference's rows, as f16 and f32, cell-major and transposed, for a
    batch of several layers at once."""
    if backend_status()["cuda"] != "available":
        pytest.skip(f"cuda backend {backend_status()['cuda']}")
    preps = _level_batches(monkeypatch, variant, defer_basis=False)
    for prep in preps[:3]:
        for out_f16, transposed in LAYOUTS:
            want = _laid_out(prep, out_f16, transposed)
            section_decode.reference_decode(want)
            got = _laid_out(prep, out_f16, transposed)
            section_decode.run(got)
            for a, b in zip(want.jobs, got.jobs):
                assert bytes(a.rows) == bytes(b.rows), f"f16 {out_f16}, transposed {transposed}: {a.info.name}"
