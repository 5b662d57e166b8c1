"""The op table: every op of every available backend against its numpy reference, with the op's
own tolerance; and the backend policy."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from nexus_gguf.backends import BACKENDS, OPS, backend_features, backend_name, backend_status, implementation, kernel, recording
from nexus_gguf.backends.reference import RANS_PROB_BITS


def _rans_freqs(symbols):
    from nexus_gguf.stages.entropy import normalized_freqs

    return normalized_freqs(np.bincount(symbols))


def _inputs(op: str, seed: int):
    """Argument tuples for `op`: edge cases first, then random ones."""
    rng = np.random.default_rng(seed)
    if op in ("byteplane_split", "byteplane_merge"):
        return [(rng.integers(0, 256, n * es, dtype=np.uint8), es) for es in (1, 2, 4) for n in (0, 1, 7, 4099)]
    if op == "e8_nearest":
        ties = rng.integers(-12, 13, (500, 8)) / 4.0  # exactly halfway cases
        # a few ulps off the halfway cases: the two cosets' distances then differ by about their
        # rounding, and summing them in another order picks the other point in ~1 of 700 rows
        quarter = rng.integers(-12, 13, (20000, 8)) / 4.0
        near = quarter + rng.integers(-3, 4, quarter.shape) * np.spacing(np.maximum(np.abs(quarter), 0.25))
        return [(rng.standard_normal((3000, 8)) * 2.5,), (ties,), (near,), (np.zeros((0, 8)),)]
    if op in ("rans_encode", "rans_decode"):
        out = []
        for n, p in ((1, 0.5), (20000, 0.3), (5000, 0.9)):
            sym = np.minimum(rng.geometric(p, n) - 1, 40)
            freqs = _rans_freqs(sym)
            if op == "rans_encode":
                out.append((sym, freqs))
            else:
                out.append((OPS["rans_encode"].reference(sym, freqs), freqs, n))
        return out
    if op in ("rans_encode_lanes", "rans_decode_lanes"):
        out = []
        for n, lanes, chunk in ((1, 1, 1), (100, 8, 8), (20000, 32, 20000), (20000, 32, 4096), (5, 16, 16),
                                (20003, 4, 4096), (7, 4, 4), (6, 4, 16384), (3, 4, 8)):  # 4 lanes: the presets
            sym = np.minimum(rng.geometric(0.3, n) - 1, 40)
            freqs = _rans_freqs(sym)
            if op == "rans_encode_lanes":
                out.append((sym, freqs, lanes, chunk))
            else:
                lengths, body = OPS["rans_encode_lanes"].reference(sym, freqs, lanes, chunk)
                out.append((body, lengths, freqs, n, lanes, chunk))
        return out
    if op == "lattice_quantize":
        out = []
        for m in (0, 1, 5000, 4099):  # 4099: groups of 8 at once and a rest
            x = rng.standard_normal((m, 8)) * np.exp2(rng.normal(0, 4, (m, 1)))
            step = np.exp2(rng.normal(-2, 3, m))
            step[::9] = 0.0
            out.append((x, step))
        quarter = rng.integers(-40, 41, (3000, 8)) / 4.0  # ties and near-ties of E8 at step 1
        out.append((quarter + rng.integers(-2, 3, quarter.shape) * np.spacing(np.maximum(np.abs(quarter), 0.25)),
                    np.ones(3000)))
        return out
    if op == "lattice_quantize_rdo":
        out = []
        for m, width, lam in ((0, 129, 0.1), (1, 3, 0.5), (5000, 129, 0.05), (4099, 33, 0.2), (3000, 129, 0.0)):
            x = rng.standard_normal((m, 8)) * np.exp2(rng.normal(0, 2, (m, 1)))
            step = np.exp2(rng.normal(-1, 2, m))
            step[::9] = 0.0
            n_rows = 8 * 24 * 3
            rows = (rng.integers(0, n_rows // 8, m) * 8).astype(np.int64)
            # costs as the lattice builds them: -log2 of smoothed counts, rounded to 1/256 bit;
            # cheap near zero, with exact ties between candidates where rows repeat
            centre = np.abs(np.arange(width) - width // 2)
            costs = np.round((1.0 + 0.3 * centre[None, :] * rng.uniform(0.5, 2.0, (n_rows, 1))) * 256) / 256
            out.append((x, step, rows, costs, np.array([1.0, 0.9, 0.8, 0.7, 0.6]), lam))
            # scales not falling: no candidate may be skipped at the zero point
            out.append((x, step, rows, costs, np.array([0.6, 1.0, 0.8]), lam))
        quarter = rng.integers(-40, 41, (3000, 8)) / 4.0  # near-ties of E8 and of the costs
        flat = np.ones((8, 129))
        out.append((quarter + rng.integers(-2, 3, quarter.shape) * np.spacing(np.maximum(np.abs(quarter), 0.25)),
                    np.ones(3000), np.zeros(3000, np.int64), flat, np.array([1.0, 0.75, 0.5]), 0.25))
        return out
    if op == "lattice_dequantize":
        out = []
        for m, mean_groups in ((0, 0), (1, 1), (4096, 0), (4104, 24), (300, 3)):
            coset = rng.integers(0, 2, m).astype(np.uint8)
            coord = rng.integers(-40, 41, (m, 7)).astype(np.int32)
            coord[:3] = np.iinfo(np.int32).max  # extreme points still decode without overflow
            last = rng.integers(-20, 21, m).astype(np.int32)
            step = np.exp2(rng.normal(-4, 3, m))
            step[::7] = 0.0  # an all-zero block
            out.append((coset, coord, last, step, rng.standard_normal(8 * mean_groups)))
        return out
    if op == "f32_to_f16":
        special = np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.99, 65520.0, 1e9, 6.1e-5, 5.96e-8, 2.98e-8,
                            2.9802322e-08, 1e-30, -3e-6, 1.00048828125, 1.000732421875], np.float32)
        ties = (rng.integers(0, 1 << 16, 5000).astype(np.uint32) << 13).view(np.float32)  # halfway between halves
        every_half = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
        bits = rng.integers(0, 1 << 32, 20000, dtype=np.uint64).astype(np.uint32)
        randoms = bits.view(np.float32)
        randoms = randoms[~np.isnan(randoms)]
        return [(special,), (ties[~np.isnan(ties)] ,), (every_half[~np.isnan(every_half)],), (randoms,),
                ((rng.standard_normal((7, 33)) * 100).astype(np.float32),), (np.zeros(0, np.float32),)]
    if op == "f64_to_f16":
        halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
        halves = halves[np.isfinite(halves)]
        mid = (halves[:-1] + halves[1:]) / 2  # ties, and a hair either side: no double rounding through float
        bits = rng.integers(0, 1 << 63, 50000, dtype=np.uint64).view(np.float64)
        special = np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 65520.0, 1e300, 5.96e-8, 2.98e-8, 1e-300])
        return [(special,), (mid,), (np.nextafter(mid, np.inf),), (np.nextafter(mid, -np.inf),), (halves,),
                (bits[~np.isnan(bits)],), (rng.standard_normal(1000) * 3,), (np.zeros(0),)]
    if op == "quantize_q8_0":
        x = (rng.standard_normal((300, 64)) * np.exp2(rng.normal(0, 3, (300, 1)))).astype(np.float32)
        x[0] = 0.0  # an all-zero block
        x[1, :32] = np.arange(32) - 15.5  # halves after scaling
        x[2] = rng.integers(-127, 128, 64).astype(np.float32) * np.float32(0.25)  # exact multiples of the step
        return [(x,), (np.zeros(0, np.float32),), ((rng.standard_normal(32) * 1e-30).astype(np.float32),)]
    if op == "rope_rotate":
        out = []
        for n, h, d, n_rot, neox in ((0, 2, 64, 64, False), (33, 3, 64, 64, False), (33, 3, 64, 64, True),
                                     (20, 2, 128, 32, True), (20, 2, 80, 40, False)):
            theta = rng.uniform(0, 4000, (n, n_rot // 2))
            out.append(((rng.standard_normal((n, h, d)) * 30).astype(np.float32), np.cos(theta), np.sin(theta), n_rot, neox))
        return out
    if op == "hadamard_blocks":
        return [(rng.standard_normal((50, 3, 128)).astype(np.float32), b) for b in (1, 2, 4, 8, 16, 32, 64, 128)]
    if op == "basis_dequantize":
        out = []
        for n, h, d, shift, wide in ((0, 2, 64, 5, 0), (1, 1, 8, 1, 0), (300, 3, 64, 5, 0), (50, 2, 80, 7, 0), (20, 1, 128, 3, 0),
                                     (40, 2, 64, 5, 1)):
            g = d // 8
            hi = (1 << 30) if wide else 40  # wide: coordinates past the int32 sum's bound (the int64 path)
            coord = rng.integers(-hi, hi, (n, h, g, 7)).astype(np.int32)
            coord[:, :, ::3] = 0  # zero points (skipped by the C loop)
            last = rng.integers(-hi // 2, hi // 2, (n, h, g)).astype(np.int32)
            coset = rng.integers(0, 2, (n, h, g)).astype(np.uint8)
            step = np.exp2(rng.normal(-3, 3, (n, h)))
            step[:, 0] = 0.0 if n else step[:, 0]
            basis = rng.integers(-(1 << shift), (1 << shift) + 1, (h, d, d)).astype(np.int16)
            mean = rng.standard_normal(h * d) * 10 if n % 2 == 0 else np.zeros(0)
            out.append((coset, coord, last, step, basis, shift, mean))
            # with channel scales (the K weighting), with and without means
            scale = np.exp2(rng.uniform(-6, 6, h * d)).astype(np.float16).astype(np.float64)
            out.append((coset, coord, last, step, basis, shift, mean, scale))
        return out
    raise AssertionError(f"no test inputs for op {op!r}: add them here")


def _available(name: str) -> bool:
    return backend_status()[name] == "available"


@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "numpy"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_op_matches_its_reference(op, name):
    if not _available(name):
        pytest.skip(backend_status()[name])
    impl = implementation(op, name)
    if impl is None:
        pytest.skip(f"the {name} backend has no {op} kernel")
    spec = OPS[op]
    for i, args in enumerate(_inputs(op, seed=len(op))):
        want, got = spec.reference(*args), impl(*args)
        if isinstance(want, tuple):  # (lane lengths, bytes) or a tuple of arrays
            for w, g in zip(want, got):
                same = g == w if isinstance(w, bytes) else (g.dtype == w.dtype and np.array_equal(g, w))
                assert same, f"{op} case {i}: differs"
            assert len(got) == len(want)
        elif isinstance(want, bytes):
            assert got == want, f"{op} case {i}: bytes differ"
        elif spec.exact:
            assert got.dtype == want.dtype and np.array_equal(got, want), f"{op} case {i}: not bit-identical"
        else:
            np.testing.assert_allclose(got, want, rtol=spec.rtol, atol=spec.rtol * float(np.abs(want).max() or 1))


def test_every_op_has_test_inputs():
    for op in OPS:
        assert _inputs(op, 0)


def test_reference_byteplane_layout():
    x = np.array([1, 2, 3, 4, 5, 6], np.uint8)  # three 2-byte elements
    assert OPS["byteplane_split"].reference(x, 2).tolist() == [1, 3, 5, 2, 4, 6]


def test_reference_rans_rejects_a_stream_that_does_not_end_where_it_began():
    sym = np.array([0, 1, 1, 0, 2] * 50)
    freqs = _rans_freqs(sym)
    data = OPS["rans_encode"].reference(sym, freqs)
    assert sum(freqs) == 1 << RANS_PROB_BITS
    for name in [b for b in BACKENDS if _available(b) and implementation("rans_decode", b)]:
        with pytest.raises(ValueError):
            implementation("rans_decode", name)(data[:-1], freqs, sym.size)


def test_native_library_is_built():
    # pip install . compiles native/; a missing library must fail here, not hide behind Numba.
    if os.environ.get("NEXUS_GGUF_ALLOW_NO_NATIVE") == "1":
        pytest.skip("NEXUS_GGUF_ALLOW_NO_NATIVE=1")
    assert backend_status()["native"] == "available"
    assert backend_name("auto") == "native"


def test_the_build_leaves_the_parsed_declarations_beside_the_library():
    """CMake writes nxkv.h's declarations as cffi parsed them (backends/ffi_module.py) next to
    the library, and the loader takes them: a first load does not parse the header again."""
    if not _available("native"):
        pytest.skip(backend_status()["native"])
    from nexus_gguf.backends import ffi_module, native

    if os.environ.get("NEXUS_GGUF_NATIVE_LIB"):
        pytest.skip("NEXUS_GGUF_NATIVE_LIB names a library built elsewhere")
    native.load()
    lib_dir = native._PKG / "_native"
    header = next(p for p in (lib_dir / "nxkv.h", native._PKG.parent / "native/include/nxkv.h") if p.exists())
    assert ffi_module.prebuilt(lib_dir / "nxkv_ffi.py", native._cdef(header)) is not None, (
        f"no declarations for {header} in {lib_dir / 'nxkv_ffi.py'}: rebuild the library")
    assert native.declarations_from == str(lib_dir / "nxkv_ffi.py")
    # and the CUDA library's (nxkv.h's types and its own functions), where it was built
    if any((lib_dir / n).exists() for n in ("libnxkv_cuda.so", "nxkv_cuda.dll")):
        cuda_cdef = native._cdef(header) + native._cdef(header.parent / "nxkv_cuda.h", "NXKV_CUDA_CDEF")
        assert ffi_module.prebuilt(lib_dir / "nxkv_cuda_ffi.py", cuda_cdef) is not None


def test_parsed_declarations_are_taken_only_where_they_match_the_header(tmp_path):
    """ffi_module.prebuilt: the module `write` made, for exactly the declarations it was made
    from; a changed header, a damaged or missing module: None (the loader parses instead)."""
    pytest.importorskip("cffi")
    from nexus_gguf.backends import ffi_module, native

    header = next(p for p in (native._PKG / "_native" / "nxkv.h", native._PKG.parent / "native/include/nxkv.h") if p.exists())
    out = tmp_path / "nxkv_ffi.py"
    ffi_module.write(out, (header, "NXKV_CDEF"))
    cdef = native._cdef(header)
    ffi = ffi_module.prebuilt(out, cdef)
    assert ffi is not None and ffi.sizeof("nxkv_section") > 0
    if _available("native"):  # the library's ABI version through these declarations
        lib = ffi.dlopen(str(native._find("NEXUS_GGUF_NATIVE_LIB", [native._PKG / "_native" / n for n in native._library_names()])))
        assert lib.nxkv_abi_version() == lib.NXKV_ABI_VERSION
    assert ffi_module.prebuilt(out, cdef + "\nint nxkv_new_function(void);") is None
    assert ffi_module.prebuilt(tmp_path / "missing.py", cdef) is None
    out.write_text("this is not python")
    assert ffi_module.prebuilt(out, cdef) is None


def test_features_name_the_backend_that_runs_each_op():
    for policy in [b for b in BACKENDS if _available(b)]:
        features = backend_features(policy)
        assert set(features) == set(OPS)
        for op, runs in features.items():
            # the chosen backend if it has the op, else the next one down the list
            chain = BACKENDS[BACKENDS.index(policy):]
            assert runs == next(b for b in chain if _available(b) and implementation(op, b) is not None)
    assert set(backend_features("numpy").values()) == {"numpy"}


def test_recording_says_which_backend_ran_each_op():
    with recording() as used:
        kernel("byteplane_split")(np.zeros(4, np.uint8), 2)
        kernel("e8_nearest")(np.zeros((1, 8)))
    assert used == {op: backend_features()[op] for op in ("byteplane_split", "e8_nearest")}


def test_package_exposes_the_backend():
    import nexus_gguf

    assert nexus_gguf.backend == backend_name() and nexus_gguf.backend_features() == backend_features()


def _policy_in_subprocess(policy: str, **env) -> subprocess.CompletedProcess:
    code = "import nexus_gguf; print(nexus_gguf.backend, sorted(set(nexus_gguf.backend_features().values())))"
    env = {**os.environ, "NEXUS_GGUF_BACKEND": policy, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_a_broken_native_library_is_a_clear_error(tmp_path):
    """NativeLibraryError: a library that cannot be loaded, or one built for another header (ABI),
    when the native backend is asked for by name; the auto policy says why and takes the next
    backend instead."""
    missing = str(tmp_path / "libnxkv.so")
    out = _policy_in_subprocess("native", NEXUS_GGUF_NATIVE_LIB=missing)
    assert out.returncode != 0 and f"NativeLibraryError: cannot load {missing}" in out.stderr
    out = _policy_in_subprocess("auto", NEXUS_GGUF_NATIVE_LIB=missing)
    assert out.returncode == 0 and out.stdout.split()[0] in ("numba", "numpy")
    assert f"the native backend is unavailable (cannot load {missing}" in out.stderr
    if not _available("native"):
        pytest.skip(backend_status()["native"])
    from nexus_gguf.backends import native

    header = next(p for p in (native._PKG / "_native" / "nxkv.h", native._PKG.parent / "native/include/nxkv.h") if p.exists())
    other = tmp_path / "nxkv.h"
    text = header.read_text()
    abi = int(text.split("NXKV_ABI_VERSION = ")[1].split()[0])
    other.write_text(text.replace(f"NXKV_ABI_VERSION = {abi}", f"NXKV_ABI_VERSION = {abi + 1}"))
    out = _policy_in_subprocess("native", NEXUS_GGUF_NATIVE_HEADER=str(other))
    assert out.returncode != 0 and f"has ABI version {abi}, its header {other} says {abi + 1}; rebuild it" in out.stderr


def test_policy_names_the_backend():
    out = _policy_in_subprocess("numpy")
    assert out.returncode == 0 and out.stdout.split()[0] == "numpy"
    assert _policy_in_subprocess("reference").stdout.split()[0] == "numpy"  # the old name still works
    bad = _policy_in_subprocess("gpu-magic")
    assert bad.returncode != 0 and "NEXUS_GGUF_BACKEND='gpu-magic'" in bad.stderr


def test_native_f32_to_f16_portable_code_matches_the_hardware_path():
    """The C library converts with F16C where the CPU has it; the portable code (other CPUs)
    must give the same bits, checked here on every float32 exponent and the halfway cases."""
    if not _available("native"):
        pytest.skip(backend_status()["native"])
    from nexus_gguf.backends import native

    rng = np.random.default_rng(5)
    x = rng.integers(0, 1 << 32, 400000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([x[~np.isnan(x)], (rng.integers(0, 1 << 19, 100000).astype(np.uint32) << 13).view(np.float32)])
    x = x[~np.isnan(x)]
    want = OPS["f32_to_f16"].reference(x)
    assert np.array_equal(native.f32_to_f16(x, use_hardware=False), want)
    assert np.array_equal(native.f32_to_f16(x, use_hardware=True), want)


def test_pool_work_started_on_a_pool_thread_runs_there():
    """Layers decode on the pool and each layer's interleaved rANS lanes asked the same pool:
    with every worker waiting on work queued behind it, decoding deadlocked. Now nested
    parallel_map runs on the calling pool thread; checked with a timeout, not a hang."""
    import threading

    from nexus_gguf.backends import parallel_map, pool, threads

    if threads() < 2:
        pytest.skip("one core: parallel_map never uses the pool")
    rng = np.random.default_rng(3)
    sym = np.minimum(rng.geometric(0.3, 200000) - 1, 40)
    freqs = _rans_freqs(sym)
    lengths, body = OPS["rans_encode_lanes"].reference(sym, freqs, 4, 4096)
    decode = kernel("rans_decode_lanes")
    done = []

    def run():
        outs = parallel_map(lambda _: decode(body, lengths, freqs, sym.size, 4, 4096), list(range(2 * threads())))
        done.append(all(np.array_equal(o, sym) for o in outs))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=60)
    assert done == [True], "nested parallel work deadlocked the pool"
    assert pool() is pool()


def test_format_constants_of_the_c_library_match_python():
    """nxkv.h's enum nxkv_format against the numbers the Python side writes files with."""
    if not _available("native"):
        pytest.skip(backend_status()["native"])
    from nexus_gguf.backends import native, reference
    from nexus_gguf.stages import lattice

    _, lib = native.load()
    assert lib.NXKV_FORMAT_RANS_PROB_BITS == reference.RANS_PROB_BITS
    assert 1 << lib.NXKV_FORMAT_RANS_LOWER_BOUND_BITS == reference.RANS_L
    assert lib.NXKV_FORMAT_E8_GROUP == 8 == reference.e8_nearest(np.zeros((1, 8))).shape[1]
    assert lib.NXKV_FORMAT_LATTICE_LOG_STEPS == lattice.LOG_STEPS


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("op", ["e8_nearest", "lattice_quantize", "lattice_quantize_rdo", "f32_to_f16", "basis_dequantize"])
def test_native_kernels_without_cpu_extensions_match_the_reference(op, level):
    """The C library runs its AVX-512 / AVX2 / F16C versions where the CPU has them; its code for
    CPUs with fewer (level 1: AVX2 and F16C; 0: none) must give the same bits."""
    if not _available("native"):
        pytest.skip(backend_status()["native"])
    from nexus_gguf.backends import native

    _, lib = native.load()
    was = lib.nxkv_use_cpu_extensions(level)
    try:
        for i, args in enumerate(_inputs(op, seed=7)):
            want, got = OPS[op].reference(*args), implementation(op, "native")(*args)
            for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
                assert g.dtype == w.dtype and np.array_equal(g, w), f"{op} case {i}: level {level} differs"
    finally:
        lib.nxkv_use_cpu_extensions(was)


def _rans_batch(rng, shapes):
    """A batch of interleaved rANS streams as section_decode builds it: (payload, task lengths,
    freqs, stream table [n, 8] int64, the streams' symbols)."""
    from nexus_gguf.stages.entropy import normalized_freqs

    encode = implementation("rans_encode_lanes", "native")
    payload, lengths, freqs, table, want = [], [], [], [], []
    at = tasks = n_freqs = out0 = 0
    for n, lanes, chunk, alphabet, p in shapes:
        sym = np.minimum(rng.geometric(p, n) - 1, alphabet - 1) if n else np.zeros(0, np.int64)
        if n and alphabet > 1:
            sym[rng.integers(0, n)] = alphabet - 1  # the widest symbol occurs
        f = normalized_freqs(np.bincount(sym, minlength=alphabet)) if n else np.array([1 << RANS_PROB_BITS])
        lens, body = encode(sym, f, lanes, chunk)
        table.append((at, tasks, n, lanes, chunk, n_freqs, f.size, out0))
        payload.append(body)
        lengths.append(lens)
        freqs.append(f)
        want.append(sym)
        at, tasks, n_freqs, out0 = at + len(body), tasks + lens.size, n_freqs + f.size, out0 + n
    return (np.frombuffer(b"".join(payload), np.uint8).copy(), np.concatenate(lengths).astype(np.int64),
            np.concatenate(freqs).astype(np.int64), np.array(table, np.int64), want)


def _decode_streams(payload, lengths, freqs, table, n_symbols):
    from nexus_gguf.backends import native

    ffi, lib = native.load()
    symbols = np.full(n_symbols, -7, np.int32)
    status = np.full(len(table), 99, np.int32)
    r = lib.nxkv_rans_decode_streams(ffi.from_buffer("uint8_t[]", payload), payload.size, ffi.from_buffer("int64_t[]", lengths),
                                     lengths.size, ffi.from_buffer("int64_t[]", freqs), freqs.size,
                                     ffi.cast("nxkv_rans_stream *", ffi.from_buffer("int64_t[]", table)), len(table),
                                     ffi.from_buffer("int32_t[]", symbols), n_symbols, ffi.from_buffer("int32_t[]", status))
    return r, symbols, status


def test_native_batch_rans_decoder_matches_each_stream_decoded_alone():
    """nxkv_rans_decode_streams (section_decode's one call per layer; AVX-512 rounds of 8 chunks
    where the CPU has it, compact tables for small alphabets) gives each stream's symbols and,
    for damaged bytes, refuses exactly the streams that the one-stream decoder refuses (or
    decodes them to the same symbols), with the extensions on and off."""
    if not _available("native"):
        pytest.skip(backend_status()["native"])
    from nexus_gguf.backends import native

    _, lib = native.load()
    decode_one = implementation("rans_decode_lanes", "native")
    rng = np.random.default_rng(11)
    # (symbols, lanes, chunk, alphabet, geometric p): the presets' shape (4 lanes, chunks of
    # 16384, many chunks, partial last chunks) and the others
    shapes = [(16384 * 5 + 100, 4, 16384, 12, 0.3), (16384 * 3, 4, 16384, 2, 0.9), (16384 * 2 + 3, 4, 16384, 256, 0.02),
              (40000, 4, 4096, 300, 0.01), (5, 4, 16384, 3, 0.5), (3, 4, 16384, 3, 0.5), (0, 4, 16384, 1, 0.5),
              (7000, 1, 7000, 5, 0.4), (9000, 8, 1000, 40, 0.2), (4096 * 9, 4, 4096, 1, 0.5), (20000, 4, 4096, 2000, 0.001),
              (16384 * 4, 4, 16384, 64, 0.05)]
    # and chunks of many lengths, so that the SIMD rounds' groups of eight go on past their
    # shortest chunks (those chunks' lanes sitting out) and end at different rounds
    shapes += [(n, 4, 16384, 6, 0.3) for n in (4, 7, 37, 130, 1001, 2500, 4099, 6000, 9, 12000, 16383, 600, 5, 8191, 3333, 70)]
    payload, lengths, freqs, table, want = _rans_batch(rng, shapes)
    n_symbols = int(table[:, 2].sum())
    was = lib.nxkv_use_cpu_extensions(1)
    try:
        for extensions in (2, 1, 0):
            lib.nxkv_use_cpu_extensions(extensions)
            r, symbols, status = _decode_streams(payload, lengths, freqs, table, n_symbols)
            assert r == lib.NXKV_OK and not status.any()
            np.testing.assert_array_equal(symbols, np.concatenate(want))
            for trial in range(40):  # damaged bytes in one stream, behind the same lane table
                bad = payload.copy()
                k = int(rng.integers(0, len(table)))
                off, task0, n, lanes, chunk, freq0, nf, out0 = table[k]
                size = int(lengths[task0 : task0 + (-(-n // chunk) if n else 0) * lanes].sum())
                if not size:
                    continue
                for at in rng.integers(off, off + size, int(rng.integers(1, 4))):
                    bad[at] ^= int(rng.integers(1, 256))
                r, symbols, status = _decode_streams(bad, lengths, freqs, table, n_symbols)
                assert r == lib.NXKV_OK
                for i, (off, task0, n, lanes, chunk, freq0, nf, out0) in enumerate(table):
                    n_tasks = (-(-n // chunk) if n else 0) * lanes
                    data = bad[off : off + int(lengths[task0 : task0 + n_tasks].sum())].tobytes()
                    try:
                        one = decode_one(data, lengths[task0 : task0 + n_tasks], freqs[freq0 : freq0 + nf], int(n), int(lanes), int(chunk))
                    except ValueError:
                        assert status[i] == lib.NXKV_ERR_CORRUPT, f"trial {trial}: stream {i} not refused"
                        continue
                    assert status[i] == 0, f"trial {trial}: stream {i} refused, the one-stream decoder takes it"
                    np.testing.assert_array_equal(symbols[out0 : out0 + n], one)
            broken = freqs.copy()
            broken[table[0, 5]] += 1  # a table that does not sum to 2^14
            assert _decode_streams(payload, lengths, broken, table, n_symbols)[2][0] == lib.NXKV_ERR_CORRUPT
            for field, value in ((7, n_symbols), (0, payload.size), (1, lengths.size), (5, freqs.size), (3, 0)):
                lying = table.copy()
                lying[-1, field] = value  # past the arrays' ends (or no lanes): refused, nothing read
                assert _decode_streams(payload, lengths, freqs, lying, n_symbols)[0] == lib.NXKV_ERR_ARG
    finally:
        lib.nxkv_use_cpu_extensions(was)


def test_native_batch_rans_decoder_takes_a_one_symbol_stream_as_the_one_stream_decoder_does():
    """A stream whose table gives every slot to one symbol (pruned components' classes) is
    decoded without stepping through its symbols: the same symbols, and the same lanes taken or
    refused as the one-stream decoder, crafted ones included (a lane whose start state is
    renormalised into the end state by a fifth byte is sound; short, long or wrong ones are not)."""
    if not _available("native"):
        pytest.skip(backend_status()["native"])
    decode_one = implementation("rans_decode_lanes", "native")
    freqs = np.array([0, 1 << RANS_PROB_BITS, 0], np.int64)  # symbol 1 holds every slot
    end = (1 << 23).to_bytes(4, "big")
    lanes_cases = [
        [end, end, end, end], [end, b"", b"", b""], [b"\x00\x00\x80\x00\x00", end, end, end],
        [b"\x00\x00\x80\x00", end, end, end], [end + b"\x00", end, end, end], [end[:3], end, end, end],
        [b"\x00\x00\x80\x00\x01", end, end, end], [end, end, end, b""], [end, b"", b"", end],
    ]
    for lanes in lanes_cases:
        for n in (1, 4, 9):
            body = b"".join(lanes)
            lengths = np.array([len(x) for x in lanes], np.int64)
            table = np.array([[0, 0, n, 4, 16384, 0, freqs.size, 0]], np.int64)
            r, symbols, status = _decode_streams(np.frombuffer(body, np.uint8).copy(), lengths, freqs, table, n)
            assert r == 0
            try:
                want = decode_one(body, lengths, freqs, n, 4, 16384)
            except ValueError:
                assert status[0] != 0, (lanes, n)
                continue
            assert status[0] == 0, (lanes, n)
            np.testing.assert_array_equal(symbols, want)
            assert (symbols == 1).all()


def test_prepare_and_run_overlaps_preparation_with_runs_and_raises_the_first_error_in_order():
    """backends.prepare_and_run (the CPU library's layer batches): every item prepared here and
    run on the pool, at most `window` prepared and not yet run; on an error, the earliest item's
    is raised, after every run already started has finished."""
    import threading
    import time

    from nexus_gguf.backends import prepare_and_run

    lock = threading.Lock()
    state = {"open": 0, "most": 0, "ran": [], "running": 0}

    def prepare(i):
        if i == "bad-prepare":
            raise KeyError("prepare")
        with lock:
            state["open"] += 1
            state["most"] = max(state["most"], state["open"])
        return i

    def run(i):
        with lock:
            state["running"] += 1
        time.sleep(0.002)
        with lock:
            state["open"] -= 1
            state["running"] -= 1
            state["ran"].append(i)
        if i == "bad-run":
            raise ValueError("run")

    prepare_and_run(prepare, run, list(range(40)), window=3)
    assert sorted(state["ran"]) == list(range(40)) and state["most"] <= 3 and state["open"] == 0
    state["ran"].clear()
    with pytest.raises(ValueError):  # an earlier item's run fails before a later one's preparation
        prepare_and_run(prepare, run, [0, 1, "bad-run", 3, "bad-prepare", 5], window=8)
    assert state["running"] == 0
    state["ran"].clear()
    with pytest.raises(KeyError):
        prepare_and_run(prepare, run, [0, 1, "bad-prepare", 3], window=8)
    assert state["running"] == 0 and sorted(state["ran"]) == [0, 1]  # 3 never prepared

def test_prepare_and_run_opens_a_place_when_any_run_ends_and_keeps_to_its_budget():
    """A long run does not hold back the items after it (a place in the window opens when any
    run ends, not only the oldest), and with a byte budget no more are prepared once those
    waiting hold it, unless only as many as the threads are."""
    import threading
    import time

    from nexus_gguf.backends import prepare_and_run, threads

    if threads() < 2:
        pytest.skip("one core: each item runs as it is prepared")
    lock = threading.Lock()
    log = []

    def prepare(i):
        with lock:
            log.append(("prepared", i))
        return i

    def run(i):
        time.sleep(0.3 if i == 0 else 0.002)
        with lock:
            log.append(("ran", i))

    prepare_and_run(prepare, run, list(range(12)), window=3)
    before = log[: log.index(("ran", 0))]
    assert sum(1 for what, _ in before if what == "prepared") >= 8, before  # waiting on item 0: 3

    held = {"now": 0, "most": 0}

    def prepare_costly(i):
        with lock:
            held["now"] += 10
            held["most"] = max(held["most"], held["now"])
        return i

    def run_costly(i):
        time.sleep(0.002)
        with lock:
            held["now"] -= 10

    prepare_and_run(prepare_costly, run_costly, list(range(30)), window=100, cost=lambda i: 10, budget=25)
    assert held["now"] == 0 and held["most"] <= 10 * (threads() + 1)
