"""Fuzzing the readers of untrusted input: the container, the header, every stage decoder, the
llama.cpp state parser. Inputs are the golden files mutated (with their CRCs made valid again,
so the decoders behind the checksums are reached) and random bytes. The only exceptions allowed
are the documented ones (NxkvError and its subclasses); nothing may hang or allocate past the
bounds the file's header and model allow.

A short run on every test run; a long one with NEXUS_GGUF_FUZZ_EXAMPLES=25000 (hypothesis keeps
the failing inputs it finds in .hypothesis/, and tests/fuzz/ holds inputs that once failed)."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import tempfile

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import golden  # noqa: E402
from nexus_gguf import format as fmt  # noqa: E402
from nexus_gguf.backends import backend_name  # noqa: E402
from nexus_gguf.errors import NxkvError  # noqa: E402
from nexus_gguf.llama_state import parse_state  # noqa: E402

EXAMPLES = int(os.environ.get("NEXUS_GGUF_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 1000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
VERSIONS = sorted(int(d[1:]) for d in os.listdir(golden.FIXTURES) if d.startswith("v") and d[1:].isdigit())
FILES = sorted(os.path.join(golden.version_dir(v), e["file"]) for v in VERSIONS for e in golden.load_manifest(v)["files"])
CORPUS = os.path.join(os.path.dirname(__file__), "fuzz")


@contextlib.contextmanager
def _as_file(data: bytes, suffix: str = ".nxkv"):
    """The path of a temporary file holding `data`, removed afterwards (the readers open paths)."""
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
        f.write(data)
    try:
        yield f.name
    finally:
        os.unlink(f.name)


@functools.lru_cache(maxsize=None)
def _numba_compiled() -> None:
    """Every golden file decoded once, untraced: Numba compiles (or loads) each kernel on its
    first call, and the compiler's allocations are not the decoder's."""
    for path in FILES:
        golden.decode_file(path)["file"].close()


@contextlib.contextmanager
def _traceable_threads():
    """For the Numba and numpy backends while tracemalloc runs: one thread (their kernels
    allocate traced memory on the pool's threads, and CPython's tracemalloc races with
    allocations made without the GIL: gh-128679, fixed in 3.12.9 / 3.13.2; on 3.11 the fuzz run
    crashed in traceback_new under both), and Numba's kernels compiled beforehand. The native
    library's buffers are not traced."""
    backend = backend_name()
    if backend in ("native", "cuda"):
        yield
        return
    if backend == "numba":
        _numba_compiled()
    was = os.environ.get("NEXUS_GGUF_THREADS")
    os.environ["NEXUS_GGUF_THREADS"] = "1"
    try:
        yield
    finally:
        if was is None:
            del os.environ["NEXUS_GGUF_THREADS"]
        else:
            os.environ["NEXUS_GGUF_THREADS"] = was


def _decode(data: bytes) -> None:
    """Everything load_state does short of llama.cpp, on bytes, its Python and numpy allocations
    traced: their peak must stay within _allocation_bound (the native library's own buffers
    are sized from the same checked counts, but tracemalloc does not see them)."""
    import tracemalloc

    refused = None
    with _as_file(data) as path, _traceable_threads():
        tracemalloc.start()
        try:
            golden.decode_file(path)["file"].close()
        except NxkvError as e:
            refused = e.with_traceback(None)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    bound = _allocation_bound(data)
    assert peak <= bound, f"decoding {len(data)} bytes allocated {peak} bytes at its peak, past the bound {bound}"
    if refused is not None:
        raise refused


def _allocation_bound(data: bytes) -> int:
    """What decoding `data` may allocate: 16 MiB, plus four times the file, plus four times the
    largest state its header's model record allows (two caches of n_ctx cells of f32 K and V in
    every layer, a logits row, the tokens), or nothing more where the header does not parse.
    The golden files peak at 0.1-0.8 of that state (tests/fuzz/README.md)."""
    from nexus_gguf.header import Header

    state = 0
    try:
        with fmt.NxkvFile(data) as f:
            limits = Header(f.header).limits()
        state = 2 * limits.n_ctx * limits.n_layer * 4 * (limits.n_embd_k + limits.n_embd_v) + 4 * limits.n_vocab + 4 * limits.n_ctx
    except NxkvError:
        pass
    return (16 << 20) + 4 * len(data) + 4 * state


def _repacked(path: str, edit_header=None, edit_section=None) -> bytes:
    f = fmt.NxkvFile.open(path)
    header = copy.deepcopy(f.header)
    if edit_header:
        edit_header(header)
    sections = [(n, edit_section(n, bytes(f.section(n))) if edit_section else bytes(f.section(n))) for n in f.names()]
    return b"".join(bytes(b) for b in fmt.pack(header, sections))


def _allowed(fn, *args) -> None:
    try:
        fn(*args)
    except NxkvError:
        pass


def _section_edit(data, names: list, hows: list):
    """An edit_section for _repacked: one drawn section flipped, cut, extended or zeroed at a
    drawn place (the others untouched)."""
    target = data.draw(st.sampled_from(names))
    how = data.draw(st.sampled_from(hows))

    def edit(name, body):
        if name != target or not body:
            return body
        b = bytearray(body)
        i = data.draw(st.integers(0, len(b) - 1))
        if how == "flip":
            b[i] ^= data.draw(st.integers(1, 255))
        elif how == "cut":
            del b[i:]
        elif how == "extend":
            b[i:i] = data.draw(st.binary(min_size=1, max_size=64))
        else:
            b[i : i + 16] = bytes(len(b[i : i + 16]))
        return bytes(b)

    return edit


@FUZZ
@given(st.sampled_from(FILES), st.data())
def test_mutated_sections_behind_valid_crcs(path, data):
    """Flip, cut or extend one section, recompute every CRC: only documented errors."""
    edit = _section_edit(data, fmt.NxkvFile.open(path).names(), ["flip", "cut", "extend", "zero"])

    _allowed(_decode, _repacked(path, edit_section=edit))


@FUZZ
@given(st.sampled_from(FILES), st.data())
def test_mutated_headers_behind_valid_crcs(path, data):
    """Replace one value anywhere in the header JSON (sizes, shapes, types, stage options)."""
    raw = fmt.NxkvFile.open(path).header
    paths = []

    def walk(node, trail):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, trail + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, trail + [i])
        paths.append(trail)

    walk(raw, [])
    trail = data.draw(st.sampled_from([p for p in paths if p]))
    value = data.draw(st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=False),
                                st.text(max_size=8), st.lists(st.integers(-5, 1 << 40), max_size=3)))

    def edit(header):
        node = header
        for key in trail[:-1]:
            node = node[key]
        node[trail[-1]] = value

    try:
        data_bytes = _repacked(path, edit_header=edit)
    except (ValueError, TypeError):  # the writer itself refuses (a JSON the format cannot hold)
        return
    _allowed(_decode, data_bytes)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(blob):
    _allowed(_decode, fmt.MAGIC + blob)
    _allowed(_decode, blob)


@FUZZ
@given(st.sampled_from(FILES), st.data())
def test_mutated_llama_state_blobs(path, data):
    """llama.cpp state blobs (the lossless golden files rebuild real ones) cut and flipped."""
    blob = bytearray(golden.decode_file(path)["blob"])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(blob)))
    for kind in ("sequence", "context"):
        _allowed(parse_state, bytes(blob[:cut]), kind)
        _allowed(parse_state, bytes(blob), kind)


@functools.lru_cache(maxsize=None)
def _llama_file(path: str) -> tuple[bytes, str]:
    """The golden file's state as the llama.cpp file that holds its kind (a context's as a
    session file, a sequence's as a slot file), and that state kind."""
    from nexus_gguf.llama_files import LlamaFile

    d = golden.decode_file(path)
    d["file"].close()
    kind = d["header"].state["kind"]
    file = LlamaFile("session" if kind == "context" else "slot", d["tokens"], d["blob"])
    return b"".join(bytes(b) for b in file.to_buffers()), kind


@FUZZ
@given(st.sampled_from(FILES), st.data())
def test_mutated_llama_session_and_slot_files(path, data):
    """`nexus-gguf compress`'s readers: llama.cpp session and slot files (read_llama_file, then
    the state parser on what it holds), cut and flipped anywhere, the count of tokens included."""
    from nexus_gguf.llama_files import read_llama_file

    raw, kind = _llama_file(path)
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] ^= data.draw(st.integers(1, 255))
    b = b[: data.draw(st.integers(0, len(b)))]

    def read(path):
        got = read_llama_file(path)
        parse_state(got.blob, got.state_kind)

    with _as_file(bytes(b), ".bin") as path:
        _allowed(read, path)


def test_committed_corpus():
    """Inputs that once failed (tests/fuzz/*.nxkv): each is still refused, with a documented
    error and within the allocation bound."""
    names = sorted(n for n in os.listdir(CORPUS) if n.endswith(".nxkv"))
    assert names
    for name in names:
        with pytest.raises(NxkvError):
            _decode(open(os.path.join(CORPUS, name), "rb").read())


def test_the_allocation_bound_is_checked(monkeypatch):
    """_decode's bound is not vacuous: a decoder that allocated past it fails the fuzz targets."""
    import io

    import numpy as np

    data = open(FILES[0], "rb").read()
    _decode(data)  # a sound file: within the bound
    monkeypatch.setattr(golden, "decode_file", lambda path: {"file": io.BytesIO(), "blob": np.ones(_allocation_bound(data) // 8 + 1)})
    with pytest.raises(AssertionError, match="past the bound"):
        _decode(data)


def _decode_with(data: bytes, patches: list) -> list:
    """Decoding `data` once per entry of `patches` ((object, attribute, value) to set for that
    run, or none): the blob, or the NxkvError raised (without its traceback), of each run."""
    out = []
    with _as_file(data) as path:
        for patch in patches:
            with pytest.MonkeyPatch.context() as m:
                for target, name, value in patch:
                    m.setattr(target, name, value)
                try:
                    d = golden.decode_file(path)
                    d["file"].close()
                    out.append(d["blob"])
                except NxkvError as e:
                    # the error without its traceback: kept with it, each run's frames (decoded
                    # arrays) stayed alive until a full GC, and 20000 runs filled 24 GB
                    out.append(e.with_traceback(None))
                    e.__context__ = e.__cause__ = None
    return out


def _decode_both(data: bytes):
    """(CPU result, GPU-path result) of decoding `data`: the blob, or the NxkvError raised. The GPU
    path runs the batch on the CUDA library where a GPU answers (tools/gpu_check.sh fuzzes it
    there), else through the numpy reference of its kernels (section_decode.reference_decode)."""
    from nexus_gguf import section_decode, state_file
    from nexus_gguf.backends import backend_status

    def reference(pipeline, work):
        section_decode.reference_decode(section_decode.prepare(pipeline, work))

    gpu = section_decode.decode_sections if backend_status()["cuda"] == "available" else reference
    return _decode_with(data, [[], [(state_file, "_gpu_decoder", lambda: gpu)]])


GPU_FILES = [p for p in FILES if any(k in os.path.basename(p) for k in ("gemma3-high", "gemma3-max", "f16-vtrans-high", "gemma3-long-high"))]
PCA_FILES = [p for p in FILES if "gemma3-long-high" in os.path.basename(p)]


@FUZZ
@given(st.sampled_from(PCA_FILES), st.data())
def test_cpu_batch_agrees_with_the_stages_on_damaged_pca_sections(path, data):
    """Format 2's `high` (PCA basis, per-class symbol columns) damaged behind valid CRCs: the CPU
    library's one-pass batch (core/section.h; its rANS rounds and tiles at each level of CPU
    extensions) refuses with a documented error exactly when the stage-by-stage path does, and
    otherwise makes the same blob."""
    from nexus_gguf import state_file
    from nexus_gguf.backends import backend_status

    if backend_status()["native"] != "available":
        pytest.skip(f"native backend {backend_status()['native']}")
    from nexus_gguf.backends import native

    with fmt.NxkvFile.open(path) as f:
        names = [n for n in f.names() if n[:2] in ("k.", "v.")]
    edit = _section_edit(data, names, ["flip", "cut", "zero"])
    # the library's code for each level of CPU extensions (portable, AVX2, AVX-512) meets the damage
    level = data.draw(st.sampled_from([2, 1, 0]), label="cpu extensions")
    _, lib = native.load()
    was = lib.nxkv_use_cpu_extensions(level)
    try:
        out = _decode_with(_repacked(path, edit_section=edit),
                           [[(state_file, "_native_batches", lambda batch=batch: batch)] for batch in (False, True)])
    finally:
        lib.nxkv_use_cpu_extensions(was)
    stages, batch = out
    if isinstance(stages, Exception) or isinstance(batch, Exception):
        assert isinstance(stages, Exception) and isinstance(batch, Exception), (stages, batch)
    else:
        assert stages == batch


def test_cpu_batch_checks_a_deferred_basis_against_its_stream_type():
    """Found by the test above (long run, 2026-11-30): a basis stream whose record says uint8
    (one bit flipped) was refused stage by stage but accepted by the CPU batch, which decodes the
    bases with the point streams on its workers (fill_bases) and checked only their bit width."""
    from nexus_gguf import state_file
    from nexus_gguf.backends import backend_status

    if backend_status()["native"] != "available":
        pytest.skip(f"native backend {backend_status()['native']}")
    path = next(p for p in PCA_FILES if os.path.basename(p) == "gemma3-long-high.nxkv")

    def flip(name, body):
        return body[:919] + bytes([body[919] ^ 1]) + body[920:] if name == "v.0.0.0" else body

    out = _decode_with(_repacked(path, edit_section=flip),
                       [[(state_file, "_native_batches", lambda batch=batch: batch)] for batch in (False, True)])
    assert [str(e) for e in out] == ["v.0.0.0/basis: values outside the stream's type uint8"] * 2, out


@FUZZ
@given(st.sampled_from(FILES), st.data())
def test_stream_container_parsers_agree(path, data):
    """A section's stream records and rANS tables, damaged anywhere: the C parser
    (nxkv_parse_streams, where the native library runs) and the Python readers give the same
    streams and tables, or both refuse."""
    import numpy as np

    from nexus_gguf.header import Header
    from nexus_gguf.stages import TensorInfo
    from nexus_gguf.stages.entropy import Entropy

    with fmt.NxkvFile.open(path) as f:
        names = [n for n in f.names() if n[:2] in ("k.", "v.")]
        if not names or "entropy" not in [c["id"] for c in Header(f.header, path).pipeline.get_config()["stages"]]:
            return
        name = data.draw(st.sampled_from(names))
        body = _section_edit(data, [name], ["flip", "cut", "extend", "zero"])(name, bytes(f.section(name)))
    info = TensorInfo(name, "f16", 2, data.draw(st.sampled_from([1, 10**3, 10**6, 10**9])))
    d = np.frombuffer(body, np.uint8)
    assert golden.parsed_streams(Entropy().streams, d, info) == golden.parsed_streams(Entropy()._streams_read, d, info)


@FUZZ
@given(st.sampled_from(GPU_FILES), st.data())
def test_gpu_decode_path_agrees_with_the_cpu_on_damaged_sections(path, data):
    """A K/V section flipped or cut behind valid CRCs: the GPU path's batch (host parsing, and its
    kernels or their numpy reference) refuses with a documented error exactly when the CPU path does, and
    otherwise makes the same blob."""
    names = [n for n in fmt.NxkvFile.open(path).names() if n[:2] in ("k.", "v.")]
    edit = _section_edit(data, names, ["flip", "cut", "zero"])

    cpu, gpu = _decode_both(_repacked(path, edit_section=edit))
    if isinstance(cpu, Exception) or isinstance(gpu, Exception):
        assert isinstance(cpu, Exception) and isinstance(gpu, Exception), (cpu, gpu)
    else:
        assert cpu == gpu


@FUZZ
@given(st.data())
def test_gpu_encode_path_writes_the_cpu_writers_bytes_for_any_values(data):
    """Random sections (cells, heads, head sizes with Hadamard blocks of several sizes, value
    scales, zero heads, extremes, sinks, positions) through the GPU encoder's batch and the numpy
    reference of its kernels: the CPU writer's bytes, or the same error."""
    import numpy as np

    from nexus_gguf import cuda_encode
    from nexus_gguf.pipeline import Pipeline
    from nexus_gguf.stages import TensorInfo

    n = data.draw(st.integers(1, 40))
    h = data.draw(st.integers(1, 3))
    d = data.draw(st.sampled_from([8, 16, 48, 64, 80]))
    kind = data.draw(st.sampled_from(["k", "v"]))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = data.draw(st.sampled_from([1e-6, 0.01, 1.0, 100.0, 3e4]))
    with np.errstate(over="ignore"):  # 3e4-scale values overflow f16 to infinity now and then: kept
        values = (rng.standard_normal((n, h * d)) * scale).astype(np.float16)
    if data.draw(st.booleans()):
        values[:, : d] = 0  # a head of zeros: its scale is the log scale's zero
    if data.draw(st.booleans()):
        values[rng.integers(0, n), rng.integers(0, h * d)] = np.float16(65504.0)
    positions = np.sort(rng.choice(10_000, n, replace=False)).astype(np.int32) if data.draw(st.booleans()) else np.arange(n, dtype=np.int32)
    transposed = kind == "v" and data.draw(st.booleans())
    stages = [
        {"id": "rope", "mode": data.draw(st.sampled_from(["norm", "neox"])), "n_rot": 2 * data.draw(st.integers(1, d // 2)),
         "freq_base": 10000.0},
        {"id": "hadamard"},
        {"id": "lattice", "k_bits": data.draw(st.sampled_from([1.5, 3.0, 3.5, 8.0])), "v_bits": 3.0, "scale_scope": "head",
         "center": data.draw(st.booleans()), "sinks": data.draw(st.sampled_from([0, 4, 100]))},
        {"id": "entropy", "lanes": data.draw(st.sampled_from([1, 4])), "chunk": data.draw(st.sampled_from([0, 16, 16384])),
         "small_streams": data.draw(st.sampled_from([0, 64, 4096]))},
    ]
    pipeline = Pipeline.from_config({"stages": stages})
    info = TensorInfo(f"{kind}.0.0.0", "f16", 2, n * h * d, kind=kind, positions=positions, model_layer=0, n_cells=n,
                      n_heads=h, head_dim=d)
    rows = np.ascontiguousarray(values.T if transposed else values).view(np.uint8)

    def cpu():
        return bytes(pipeline.encode_values(values.astype(np.float32), info))

    def gpu():
        job = cuda_encode.EncodeJob(info.name, info, rows, True, transposed)
        return bytes(cuda_encode.encode_sections(pipeline, [job], engine=cuda_encode._ReferenceEngine())[0][1])

    results = []
    for fn in (cpu, gpu):
        try:
            with np.errstate(all="ignore"):  # caches holding infinities: refused below, not warned about
                results.append(fn())
        except (ValueError, NxkvError) as e:
            results.append(type(e))
    assert results[0] == results[1]
