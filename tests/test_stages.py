"""Each stage's decode(encode(x)) against its numpy reference, kernels across backends, and the
pipeline's rules."""

from __future__ import annotations

import dataclasses
import itertools
import json
import warnings

import numpy as np
import pytest

import golden
from nexus_gguf.backends import backend_status, numba_cpu, reference
from nexus_gguf.errors import ConfigError, FormatError
from nexus_gguf.pipeline import PRESETS, Pipeline, ablations, build_pipeline
from nexus_gguf.stages import REGISTRY, TensorInfo, stage_from_config
from nexus_gguf.stages.delta import Delta
from nexus_gguf.stages.entropy import MAX_ALPHABET, Entropy, normalized_freqs
from nexus_gguf.stages.hadamard import Hadamard, power_of_two_blocks
from nexus_gguf.stages.lattice import Lattice
from nexus_gguf.stages.rope import Rope


def _info(kind="k", n=40, h=2, d=64, pos=None, layer=3, sliding=False):
    pos = np.arange(n, dtype=np.int32) if pos is None else pos
    return TensorInfo(f"{kind}.0.0.{layer}", "f16", 2, n * h * d * 4, kind=kind, positions=pos, model_layer=layer,
                      sliding=sliding, n_cells=n, n_heads=h, head_dim=d)


def _values(n=40, h=2, d=64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, h, d)) + 3 * rng.standard_normal((1, h, d))).astype(np.float32)


@pytest.mark.parametrize("stage_id", sorted(REGISTRY))
def test_every_config_round_trips_through_json(stage_id):
    stage = REGISTRY[stage_id]()
    config = json.loads(json.dumps(stage.get_config()))
    assert stage_from_config(config).get_config() == stage.get_config()


# ------------------------------------------------------------------ rope


def _rope(mode, n_rot=64, **kw):
    return Rope(mode=mode, n_rot=n_rot, freq_base=10000.0, **kw)


def test_rope_norm_angles_are_ggmls():
    r = _rope("norm", n_rot=8)
    theta = r.angles(np.array([0, 1, 5]), sliding=False)
    want = np.array([[p * 10000.0 ** (-2 * i / 8) for i in range(4)] for p in (0, 1, 5)])
    np.testing.assert_allclose(theta, want)
    # NORM rotates adjacent pairs: (x0, x1) of position 1 turned by theta_0 = 1 rad
    x = np.zeros((2, 1, 8), np.float32)
    x[:, 0, 0] = 1.0
    y = r.decode(x, _info(n=2, h=1, d=8))
    np.testing.assert_allclose(y[1, 0, :2], [np.cos(1.0), np.sin(1.0)], rtol=1e-6)
    assert np.all(y[0] == x[0])


@pytest.mark.parametrize("mode", ["norm", "neox"])
@pytest.mark.parametrize("n_rot", [64, 32, 16])
@pytest.mark.parametrize("extra", [{}, {"freq_scale": 0.25, "ext_factor": 1.0, "n_ctx_orig": 4096}])
def test_rope_round_trip(mode, n_rot, extra):
    x = _values()
    r = _rope(mode, n_rot, **extra)
    info = _info(pos=np.arange(1000, 1040, dtype=np.int32))
    y = r.encode(x, info)
    assert not np.allclose(y[..., :n_rot], x[..., :n_rot])
    np.testing.assert_array_equal(y[..., n_rot:], x[..., n_rot:])  # partial rotary: the rest stays
    np.testing.assert_allclose(r.decode(y, info), x, atol=1e-4)
    v = r.encode(x, _info("v"))  # values have no RoPE
    assert v is x


def test_rope_neox_pairs_halves():
    r = _rope("neox", n_rot=8)
    x = np.zeros((2, 1, 8), np.float32)
    x[:, 0, 0] = 1.0
    y = r.decode(x, _info(n=2, h=1, d=8))
    np.testing.assert_allclose(y[1, 0, [0, 4]], [np.cos(1.0), np.sin(1.0)], rtol=1e-6)


def test_rope_sliding_layers_use_their_base():
    r = Rope(mode="neox", n_rot=16, freq_base=1e6, freq_base_swa=1e4)
    pos = np.array([7])
    assert r.angles(pos, True)[0, 1] == pytest.approx(7 * 1e4 ** (-2 / 16))
    assert r.angles(pos, False)[0, 1] == pytest.approx(7 * 1e6 ** (-2 / 16))


@pytest.mark.parametrize("bad", [dict(n_rot=0), dict(n_rot=15), dict(freq_base=0.0), dict(freq_base_swa=-1.0),
                                 dict(freq_scale=-1.0), dict(freq_scale_swa=0.0), dict(freq_base=float("inf"))])
def test_rope_refuses_angles_it_cannot_make(bad):
    """A file's rope options that would turn the angles into NaN (or reverse them) are refused by
    name, before anything is decoded (the fuzz had found them refused only after, as values that
    are not finite)."""
    with pytest.raises(ConfigError, match="rope needs"):
        Rope(**{"mode": "neox", "n_rot": 16, **bad})
    Rope(mode="off", **{k: v for k, v in bad.items() if k != "n_rot"})  # unused when off


# ------------------------------------------------------------------ hadamard


@pytest.mark.parametrize("d", [64, 128, 80, 96, 192, 72])
def test_hadamard_round_trip_any_head_size(d):
    x = _values(d=d)
    info = _info(d=d)
    y = Hadamard().encode(x, info)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(Hadamard().decode(y, info), x, atol=1e-5)
    assert sum(power_of_two_blocks(d)) == d


# ------------------------------------------------------------------ E8 and the lattice stage


def _e8_roots() -> np.ndarray:
    roots = []
    for i, j in itertools.combinations(range(8), 2):
        for si, sj in itertools.product((1, -1), repeat=2):
            v = np.zeros(8)
            v[i], v[j] = si, sj
            roots.append(v)
    for signs in itertools.product((0.5, -0.5), repeat=8):
        if sum(s < 0 for s in signs) % 2 == 0:
            roots.append(np.array(signs))
    return np.array(roots)


@pytest.mark.parametrize("impl", ["reference", "numba"])
def test_e8_nearest_is_nearest(impl):
    x = np.random.default_rng(1).standard_normal((3000, 8)) * 2.5
    p = (reference if impl == "reference" else numba_cpu).e8_nearest(x)
    # a point of E8: all integers or all half-integers, even sum
    frac = p - np.floor(p)
    assert np.all((frac == 0).all(axis=1) | (frac == 0.5).all(axis=1)) and np.all(p.sum(axis=1) % 2 == 0)
    # the 240 roots are E8's Voronoi-relevant vectors: no neighbour may be closer
    roots = _e8_roots()
    assert roots.shape == (240, 8)
    d0 = ((x - p) ** 2).sum(axis=1)
    for r in roots:
        assert np.all(((x - p - r) ** 2).sum(axis=1) >= d0 - 1e-9)
    np.testing.assert_array_equal(p, reference.e8_nearest(x))


@pytest.mark.parametrize("kwargs", [
    {},
    {"scale_scope": "head"},
    {"center": False, "sinks": 0, "scale_block": 8, "scale_stat": "max", "scale_format": "f16"},
    {"scale_block": 16, "k_bits": 5.0},
])
def test_lattice_round_trip(kwargs):
    x = _values()
    info = _info()
    lat = Lattice(**kwargs)
    symbols = lat.encode(x, info)
    y = lat.decode(Entropy().decode(Entropy().encode(symbols, info), info), info)
    rms = np.sqrt(np.mean((x - x.mean(axis=0) * lat.center) ** 2))  # what the lattice sees
    err = np.sqrt(np.mean((y - x) ** 2))
    assert 0 < err < 0.3 * rms
    if lat.sinks:  # the sink cells come back as f16 of what went in
        np.testing.assert_array_equal(y[: lat.sinks], x[: lat.sinks].astype(np.float16).astype(np.float32))
    # more bits, less error
    finer = Lattice(**{**kwargs, "k_bits": lat.k_bits + 2})
    y2 = finer.decode(finer.encode(x, info), info)
    assert np.sqrt(np.mean((y2 - x) ** 2)) < err / 2


def test_lattice_stores_half_the_last_coordinate():
    x = _values()
    info = _info()
    s = Lattice().encode(x, info)
    z7 = 2 * s["coord_last"] + (s["coord"].sum(axis=2) & 1)
    assert np.all((s["coord"].sum(axis=2) + z7) % 2 == 0)
    assert np.abs(s["coord_last"]).max() < np.abs(s["coord"]).max()


def test_retired_lattice_options_load_only_where_they_changed_nothing():
    # nexus-gguf 0.1 wrote edge_layers=0, edge_bits and n_layer into every lattice config
    old = {"id": "lattice", "k_bits": 3.5, "edge_layers": 0, "edge_bits": 0.0, "n_layer": 30}
    assert stage_from_config(old).get_config() == Lattice(k_bits=3.5).get_config()
    with pytest.raises(FormatError, match="no longer supported"):
        stage_from_config({**old, "edge_layers": 2})
    assert stage_from_config({"id": "rope", "mode": "off", "skipped": "M-RoPE"}).mode == "off"


def test_lattice_rejects_bad_symbols():
    info = _info()
    s = Lattice().encode(_values(), info)
    s["coord"] = s["coord"][:, :-1]
    with pytest.raises(FormatError, match="coord"):
        Lattice().decode(s, info)


# ------------------------------------------------------------------ entropy and delta


def test_rans_backends_agree_byte_for_byte():
    rng = np.random.default_rng(3)
    sym = np.minimum(rng.geometric(0.3, 20000) - 1, 40)
    freqs = normalized_freqs(np.bincount(sym))
    a, b = reference.rans_encode(sym, freqs), numba_cpu.rans_encode(sym, freqs)
    assert a == b
    np.testing.assert_array_equal(numba_cpu.rans_decode(a, freqs, sym.size), sym)
    np.testing.assert_array_equal(reference.rans_decode(a, freqs, sym.size), sym)
    p = np.bincount(sym) / sym.size
    ideal = -(p[p > 0] * np.log2(p[p > 0])).sum() * sym.size / 8
    assert len(a) < ideal * 1.01 + 16


def test_small_streams_are_stored_the_smaller_way():
    """small_streams: a stream of few symbols is stored by rANS or zstd, whichever is smaller;
    f16 bit patterns come back as int16 holding the same bits (what the lattice's readers take);
    larger streams are coded as without the option."""
    rng = np.random.default_rng(7)
    symbols = {
        "sink": (rng.standard_normal((4, 3, 64)) * 3).astype(np.float16).view(np.uint16),
        "scale": np.array([[-12]], np.int16),
        "coord": rng.integers(-3, 4, (600, 24, 7)).astype(np.int32),
    }
    info = TensorInfo("k.0.0.0", "f16", 2, 10**6)
    plain, small = Entropy(lanes=4, chunk=16384), Entropy(lanes=4, chunk=16384, small_streams=4096)
    sizes = {}
    for e in (plain, small):
        coded = e.encode(symbols, info)
        back = e.decode(coded, info)
        sizes[e.small_streams] = {s.name: len(s.payload) for s in e.streams(coded, info)}
        assert back["sink"].view(np.uint16).tobytes() == symbols["sink"].tobytes()
        np.testing.assert_array_equal(back["scale"], symbols["scale"])
        np.testing.assert_array_equal(back["coord"], symbols["coord"])
    assert sizes[4096]["sink"] < 0.85 * sizes[0]["sink"] and sizes[4096]["scale"] < sizes[0]["scale"]
    assert sizes[4096]["coord"] == sizes[0]["coord"]
    with pytest.raises(ConfigError):
        Entropy(small_streams=-1)


def test_pca_basis_conditioning_check_agrees_with_the_svd():
    """The PCA fit's shortcut (a Cholesky factor instead of an SVD) decides as cond(q) > 1e6."""
    from nexus_gguf.stages.lattice import _ill_conditioned, pca_basis

    rng = np.random.default_rng(3)
    cases = [pca_basis(rng.standard_normal((3000, 1, d)) * np.geomspace(3, 0.01, d), 8)[0].astype(np.float64) for d in (8, 64, 192)]
    for tiny in (1e-3, 1e-5):  # condition numbers 1.3e5 and 1.3e7
        q = np.eye(8) * 128
        q[7, 7] = tiny
        cases.append(q)
    q = np.eye(8) * 128
    q[7] = q[6]
    cases += [q, np.ones((8, 8)) * 128]
    for q in cases:
        assert _ill_conditioned(q, 128) == (np.linalg.cond(q) > 1e6)


def test_normalized_freqs():
    f = normalized_freqs(np.array([1, 0, 10**6, 3]))
    assert f.sum() == 1 << 14 and f[1] == 0 and f[0] >= 1 and f[3] >= 1


def _frame_size_field_set(frame: bytes, size: int) -> bytes:
    """A small single-segment zstd frame with its one-byte content size replaced."""
    assert frame[4] == 0b00100000, "expected a single segment and a one-byte content size"
    return frame[:5] + bytes([size]) + frame[6:]


@pytest.mark.parametrize("case, match", [
    # a few bytes that claim (and would expand to) 64 MiB: refused from the claim, nothing allocated
    ("bomb", "declares 67108864 bytes, expected at most 1000"),
    ("no size", "does not declare its size"),
    ("more than declared", "zstd data is corrupt"),  # expands past the size it states
    ("less than declared", "zstd data is corrupt"),  # zstd checks the size it states
])
def test_zstd_frames_are_refused_by_their_bound(case, match):
    """Decompression bombs and lying frames, through both the zstd stage and the entropy coder's
    zstd streams (stages/zstd.decompress_bounded): a clear FormatError, and nothing near the
    claimed size allocated."""
    import tracemalloc

    import zstandard

    from nexus_gguf.stages.zstd import Zstd, decompress_bounded

    small = zstandard.ZstdCompressor().compress(b"abc" * 30)
    frame = {
        "bomb": zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20)) if case == "bomb" else b"",
        "no size": zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 500),
        "more than declared": _frame_size_field_set(small, 50),
        "less than declared": _frame_size_field_set(small, 200),
    }[case]
    assert len(frame) < 20000
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=match):
            decompress_bounded(frame, 1000, "test")
        with pytest.raises(FormatError, match=match):
            Zstd().decode(np.frombuffer(frame, np.uint8), TensorInfo("k.0.0.0", "f16", 2, 1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("coder", ["rans", "zstd"])
def test_entropy_round_trip(coder):
    rng = np.random.default_rng(4)
    symbols = {
        "coord": rng.integers(-5, 6, (30, 4, 7)).astype(np.int32),
        "wide": rng.integers(-(MAX_ALPHABET * 4), MAX_ALPHABET * 4, 100).astype(np.int32),  # goes to zstd
        "bits": rng.integers(0, 2, 50).astype(np.uint8),
        "f16": rng.standard_normal(9).astype(np.float16).view(np.uint16),
        "empty": np.zeros((0, 3), np.int16),
        # rANS decodes symbol indices in int32 and adds the stream's offset in place: the
        # largest int32 values must come back without overflow
        "int32_top": np.array([2**31 - 3, 2**31 - 1, 2**31 - 2, -(2**31)], np.int64)[:3].astype(np.int32),
        "int32_bottom": np.array([-(2**31), -(2**31) + 2, -(2**31) + 1], np.int32),
    }
    e = Entropy(coder=coder)
    info = TensorInfo("k.0.0.0", "f16", 2, 10**6)
    back = e.decode(e.encode(symbols, info), info)
    assert list(back) == list(symbols)
    for k in symbols:
        assert back[k].dtype == symbols[k].dtype and back[k].shape == symbols[k].shape
        np.testing.assert_array_equal(back[k], symbols[k])


def test_entropy_rejects_damage():
    e = Entropy()
    info = TensorInfo("k.0.0.0", "f16", 2, 10**6)
    data = e.encode({"coord": np.arange(-50, 50, dtype=np.int32).reshape(10, 10)}, info)
    for bad in (data[:-3], np.concatenate([data, data[:2]])):
        with pytest.raises(FormatError):
            e.decode(bad, info)
    flipped = data.copy()
    flipped[-1] ^= 0x5A
    with pytest.raises(FormatError):
        e.decode(flipped, info)
    with pytest.raises(FormatError, match="more than the section"):
        e.decode(data, TensorInfo("k.0.0.0", "f16", 2, 10))


def test_delta_round_trip():
    s = {"coord": np.random.default_rng(5).integers(-4, 5, (20, 3, 7)).astype(np.int32), "scale": np.arange(20)}
    d = Delta()
    enc = d.encode(s, None)
    np.testing.assert_array_equal(enc["coord"][1:], np.diff(s["coord"], axis=0))
    assert enc["scale"] is s["scale"]
    np.testing.assert_array_equal(d.decode(enc, None)["coord"], s["coord"])


# ------------------------------------------------------------------ pipelines and presets


def test_presets_build_and_are_valid():
    for name in PRESETS:
        p = build_pipeline(name)
        assert Pipeline.from_config(json.loads(json.dumps(p.get_config()))).get_config() == p.get_config()
    assert build_pipeline("lossless").lossless and not build_pipeline("high").lossless
    assert build_pipeline("high", lattice_k_bits=5).stages[-2].k_bits == 5.0


def test_pipeline_order_is_checked():
    with pytest.raises(ConfigError):
        Pipeline([Lattice()])  # no coder
    with pytest.raises(ConfigError):
        Pipeline([Entropy(), Lattice()])
    with pytest.raises(ConfigError):
        Pipeline([Lattice(), Hadamard(), Entropy()])
    with pytest.raises(FormatError):
        Pipeline.from_config({"stages": [{"id": "entropy"}]})


def test_ablations_of_a_lossy_preset():
    names = [p.preset for p in ablations("high")]
    assert "high-no-rope" in names and "high-zstd" in names and not any("lattice" in n for n in names)
    for p in ablations("high"):
        assert p.values_path


def test_numba_available():
    assert backend_status()["numba"] == "available"


def test_value_path_absorbs_llamas_rotation_instead_of_undoing_it():
    """llama.cpp stores a quantized cache's rows Hadamard-rotated (block 64 for V); the hadamard
    stage would apply the same matrix again right after it was undone. The pipeline skips both,
    and the result is the same up to float rounding."""
    from dataclasses import replace

    hadamard_blocks = reference.hadamard_blocks

    x = _values(h=3)
    # a Hadamard value path (balanced's in format 1), rope as bound to a model
    high = Pipeline([Rope(mode="norm", n_rot=64)] + [stage_from_config(c) for c in (
        {"id": "hadamard"}, {"id": "lattice", "k_bits": 3.0, "v_bits": 3.0, "scale_scope": "head"}, {"id": "entropy"})])
    v = _info("v", h=3)
    assert high.absorbs_rotation(v, 64) and not high.absorbs_rotation(v, 0)
    assert not high.absorbs_rotation(_info("k", h=3), 64)  # RoPE removal needs the unrotated keys
    assert Pipeline(high.stages[1:]).absorbs_rotation(_info("k", h=3), 64)
    assert not high.absorbs_rotation(_info("v", h=3, d=128), 64)  # the stage would use a 128 block
    stored = hadamard_blocks(x, 64)  # what a q8_0 cache holds (before its own rounding)
    absorbed = high.decode(high.encode(stored, replace(v, llama_rot=64)), replace(v, llama_rot=64))
    undone = high.decode(high.encode(hadamard_blocks(stored, 64), v), v)
    np.testing.assert_allclose(hadamard_blocks(absorbed, 64), undone, atol=1e-3 * np.abs(x).max())


def test_token_steps_follow_importance_and_split_the_streams():
    """A cell's step grows with how little attention it gets (in half octaves, at most
    step_octaves), each bucket's points get their own streams (and rANS tables), and decoding
    needs nothing but the file."""
    n = 200
    x = _values(n=n)
    importance = np.full(n, 1.0)  # the median
    importance[50:80] = 1 / 64  # 6 octaves below the median, times token_steps 0.5: 3 octaves = bucket 6
    importance[100:130] = 1 / 4  # 2 octaves: 1 octave = bucket 2
    importance[150:180] = 1 / 2 ** 12  # capped at step_octaves: bucket 6
    info = _info(n=n)
    with_imp = TensorInfo(**{**info.__dict__, "importance": importance})
    lat = Lattice(k_bits=3.5, token_steps=0.5, step_octaves=3.0)
    assert lat.uses_importance and not Lattice().uses_importance
    s = lat.encode(x, with_imp)
    assert s["bucket"].tolist() == [0] * 50 + [6] * 30 + [0] * 20 + [2] * 30 + [0] * 20 + [6] * 30 + [0] * 20
    assert {k for k in s if k.startswith("coord.")} == {"coord.0", "coord.2", "coord.6"}
    assert s["coord.6"].shape == (60, 2 * 64 // 8, 7)
    coded = Entropy().encode(s, with_imp)
    y = lat.decode(Entropy().decode(coded, info), info)  # no importance needed to decode
    err = ((y - x) ** 2).mean(axis=(1, 2))
    assert err[50:80].mean() > 4 * err[4:50].mean() and err[100:130].mean() > 1.5 * err[4:50].mean()
    plain = Lattice(k_bits=3.5).encode(x, info)
    assert len(coded) < len(Entropy().encode(plain, info))
    # without importance (a sliding-window cache, say) the stage codes one step for all
    assert "bucket" not in lat.encode(x, info)
    # so do states shorter than step_min_cells (no scores are asked for them): the same symbols
    # as without steps, read by the same decoder
    short = Lattice(k_bits=3.5, token_steps=0.5, step_octaves=3.0, step_min_cells=n + 1)
    assert short.importance_used_at(n + 1) and not short.importance_used_at(n)
    got = short.encode(x, with_imp)
    assert "bucket" not in got and all(np.array_equal(got[k], plain[k]) for k in plain)
    assert lat.importance_used_at(1) and not Lattice().importance_used_at(10**6)
    # damaged bucket streams are refused
    for bad in ({**s, "bucket": s["bucket"][:-1]}, {**s, "bucket": np.full(n, 7, np.uint8)},
                {k: v for k, v in s.items() if k != "coord.2"}):
        with pytest.raises(FormatError):
            lat.decode(bad, info)


def test_rdo_trades_error_for_bits_and_decodes_as_any_points():
    """Rate-distortion quantization (the rdo option) picks, per group, a point nearer zero where
    its bits saved outweigh the added squared error: fewer bytes, a bounded error, the same
    decoder; 0 keeps the nearest points, bucket sections get a rate model per bucket."""
    n, h, d = 600, 1, 64
    rng = np.random.default_rng(5)
    # a spectrum as after PCA: a few wide components, many narrow ones
    x = (rng.standard_normal((n, h, d)) * np.exp2(-np.arange(d) / 12.0)).astype(np.float32)
    info = _info(n=n, h=h, d=d)
    kw = dict(k_bits=3.0, scale_scope="head")
    sizes, errors = {}, {}
    for rdo in (0.0, 0.05, 0.15):
        lat = Lattice(rdo=rdo, **kw)
        symbols = lat.encode(x, info)
        coded = Entropy().encode(symbols, info)
        y = Lattice(**kw).decode(Entropy().decode(coded, info), info)  # rdo is the writer's alone
        sizes[rdo], errors[rdo] = len(coded), float(((y - x)[4:] ** 2).mean())
    assert sizes[0.15] < sizes[0.05] < sizes[0.0] and sizes[0.15] < 0.97 * sizes[0.0], sizes
    assert errors[0.0] < errors[0.05] < errors[0.15] < 2 * errors[0.0], errors
    assert all(np.array_equal(a, b) for a, b in zip(Lattice(**kw).encode(x, info).values(),
                                                    Lattice(rdo=0.0, **kw).encode(x, info).values()))
    # with importance-aware steps: one rate model per bucket, the buckets' streams as before
    importance = np.ones(n)
    importance[300:] = 1 / 64
    with_imp = dataclasses.replace(info, importance=importance)
    steps = dict(kw, token_steps=0.5, step_octaves=3.0)
    s = Lattice(rdo=0.1, **steps).encode(x, with_imp)
    assert set(s) == set(Lattice(**steps).encode(x, with_imp))
    y = Lattice(**steps).decode(s, info)
    assert float(((y - x)[4:300] ** 2).mean()) < 2 * errors[0.0]
    with pytest.raises(ConfigError):
        Lattice(rdo=-0.1)


def test_rate_costs_follow_the_counts():
    from nexus_gguf.stages.lattice import RDO_SPAN, rate_costs

    z = np.zeros((1000, 8), np.int64)  # integer points (coset 0), twice their coordinates counted
    z[:250, 0] = z[:250, 2] = 1  # rows 0 and 2: value 2 in a quarter of the groups
    z[:, 1] = 250  # beyond the span: counted at its edge
    points = (np.zeros(1000, np.uint8), z[:, :7].astype(np.int32), ((z[:, 7] - (z[:, :7].sum(axis=1) & 1)) // 2).astype(np.int32))
    costs = rate_costs(points, np.zeros(1000, np.int64), 16)
    assert costs.shape == (16, 2 * RDO_SPAN + 1)
    assert abs(costs[0, RDO_SPAN] - np.log2(4 / 3)) < 0.02 and abs(costs[0, RDO_SPAN + 2] - 2.0) < 0.02
    assert costs[1, 2 * RDO_SPAN] < 0.01 and costs[0, RDO_SPAN + 1] > 10  # never seen: costly
    assert np.array_equal(costs[8:], np.full((8, 2 * RDO_SPAN + 1), costs[8, 0]))  # rows without groups: flat
    assert np.array_equal(costs * 256, np.round(costs * 256))


def test_scoring_and_eviction_are_options_not_stages():
    from nexus_gguf.eviction import Eviction, Scoring

    evicting = build_pipeline("max")
    assert evicting.eviction == Eviction(keep=0.35) and evicting.scoring == Scoring(scorer="attention")
    # max codes the cells it keeps as balanced does, coarser, with the basis from fewer cells (so
    # that the 1434 cells kept of 4096 have one): the README's measured choice
    as_balanced = build_pipeline("balanced", lattice_k_bits=2.0, lattice_v_bits=2.0, lattice_pca_min_cells=1024)
    assert evicting.get_config()["stages"] == as_balanced.get_config()["stages"]
    assert [s.stage_id for s in evicting.stages] == ["rope", "lattice", "entropy"]
    assert build_pipeline("max", evict_keep=0.3, score_window=16).eviction.keep == 0.3
    assert build_pipeline("max", score_window=16).scoring.window == 16
    assert build_pipeline("max", without=["evict"]).eviction is None
    assert build_pipeline("balanced").eviction is None  # balanced drops no token (since format 2)
    assert build_pipeline("high").scoring == Scoring()  # the queries that weight K
    # nothing needs scores: none are computed
    assert build_pipeline("high", lattice_k_weights="none", lattice_token_steps=0.0).scoring is None
    assert build_pipeline("high", lattice_k_weights="none").scoring == Scoring()  # high's importance-aware steps
    assert build_pipeline("high", score_context=0).scoring.context == 0
    # what a save of n cells scores: high's steps from 1024 cells, its K weights from 1536
    high = build_pipeline("high")
    assert [(high.importance_used_at(n), high.queries_used_at(n), high.needs_scores_at(n)) for n in (1023, 1024, 1536)] == [
        (False, False, False), (True, False, True), (True, True, True)]
    assert build_pipeline("max").needs_scores_at(16)  # eviction scores every state
    with pytest.raises(ConfigError, match="does not evict"):
        build_pipeline("high", evict_keep=0.5)
    with pytest.raises(ConfigError, match="scorer"):
        build_pipeline("max", score_scorer="oracle")
    with pytest.raises(ConfigError, match="no option"):
        build_pipeline("max", evict_scorer="attention")  # scoring is its own option set now
    assert "max-no-evict" in [p.preset for p in ablations("max")]


@pytest.mark.parametrize("lanes, chunk", [(1, 7), (4, 0), (32, 1000), (32, 40), (64, 0)])
def test_interleaved_rans_round_trip(lanes, chunk):
    """Interleaved rANS: any number of lanes and chunks (streams shorter than a chunk, than
    the lanes, empty lanes), decoded on threads where the stream is large."""
    rng = np.random.default_rng(lanes + chunk)
    e = Entropy(lanes=lanes, chunk=chunk)
    info = TensorInfo("k.0.0.0", "f16", 2, 10**7)
    for n in (1, 3, 31, 100, 5000, 150_000):
        symbols = {"coord": np.minimum(rng.geometric(0.3, n) - 1, 40).astype(np.int32)}
        data = e.encode(symbols, info)
        np.testing.assert_array_equal(e.decode(data, info)["coord"], symbols["coord"])
        if n == 150_000:  # the lanes cost a few bytes each, nothing more
            plain = Entropy().encode(symbols, info)
            assert len(data) <= len(plain) + 10 * lanes * max(1, -(-n // (chunk or n)))
    with pytest.raises(ConfigError):
        Entropy(lanes=8, chunk=4)


def test_interleaved_rans_rejects_damage():
    e = Entropy(lanes=8, chunk=1000)
    info = TensorInfo("k.0.0.0", "f16", 2, 10**7)
    data = e.encode({"coord": np.arange(-50, 4950, dtype=np.int32) % 37}, info)
    for bad in (data[:-3], np.concatenate([data, data[:2]])):
        with pytest.raises(FormatError):
            e.decode(bad, info)
    flipped = data.copy()
    flipped[-1] ^= 0x5A
    with pytest.raises(FormatError):
        e.decode(flipped, info)


def test_vectorised_varints_read_exactly_what_the_scalar_reader_reads():
    from nexus_gguf.byte_reader import ByteReader
    from nexus_gguf.stages.entropy import _varints

    rng = np.random.default_rng(7)
    for _ in range(200):
        values = rng.integers(0, 1 << int(rng.integers(1, 42)), int(rng.integers(1, 160)))  # both paths: a byte loop up to 64
        data = _varints(values) + b"\x05tail"
        vector, scalar = ByteReader(data, "t", FormatError), ByteReader(data, "t", FormatError)
        assert vector.varints(values.size).tolist() == [scalar.varint() for _ in values] == values.tolist()
        assert vector.pos == scalar.pos
    for bad in (b"\x80" * 6 + b"\x01", b"\x80\x80"):  # seven bytes; runs out
        with pytest.raises(FormatError):
            ByteReader(bad, "t", FormatError).varints(1)
        with pytest.raises(FormatError):
            ByteReader(bad, "t", FormatError).varint()
        with pytest.raises(FormatError):  # the same after 70 good ones (the vectorised path)
            ByteReader(b"\x01" * 70 + bad, "t", FormatError).varints(71)


def test_stream_values_its_type_cannot_hold_are_refused_not_wrapped():
    # a rANS table whose smallest symbol was damaged to 256 decodes a uint8 stream to 256, 257:
    # refused (stored as uint8 they would wrap to the valid cosets 0 and 1)
    from nexus_gguf.stages.entropy import Entropy, rans_table

    ent = Entropy()
    values = np.array([0, 1, 1, 0, 1], np.uint8)
    good = ent.encode({"coset": values}, TensorInfo("k.0.0.0", "f16", 2, 100))
    assert np.array_equal(ent.decode(good, TensorInfo("k.0.0.0", "f16", 2, 100))["coset"], values)
    table = rans_table(0, np.array([6554, 9830]))
    assert bytes(table) in bytes(good)
    bad = bytes(good).replace(bytes(table), bytes(rans_table(256, np.array([6554, 9830]))))
    with pytest.raises(FormatError, match="outside the stream's type uint8"):
        ent.decode(np.frombuffer(bad, np.uint8), TensorInfo("k.0.0.0", "f16", 2, 100))


def _correlated(n, h=2, d=64, seed=1):
    """Head vectors with a few strong directions (as RoPE-removed keys have), not along channels."""
    rng = np.random.default_rng(seed)
    spread = np.exp2(-np.arange(d) / 6.0)  # component RMS falling 12 octaves over the head
    mix = np.linalg.qr(rng.standard_normal((h, d, d)))[0]
    x = np.einsum("nhj,hji->nhi", rng.standard_normal((n, h, d)) * spread, mix) + 2 * rng.standard_normal((1, h, d))
    return x.astype(np.float32)


def test_pca_transform_stores_its_basis_and_saves_bits():
    """transform=pca codes each head on its own principal axes, the basis in the section; with
    component classes the same quality costs fewer bytes than one table per stream; sections
    below pca_min_cells are coded as they are (the decoder decides the same from the cell count)."""
    n = 600
    x = _correlated(n)
    info = _info(n=n)
    plain = Lattice(k_bits=3.5, scale_scope="head")
    pca = Lattice(k_bits=3.5, scale_scope="head", transform="pca", classes=True, pca_min_cells=500)
    s = pca.encode(x, info)
    assert s["basis"].shape == (2, 64, 64) and s["basis"].dtype == np.int16 and np.abs(s["basis"]).max() <= 32
    assert s["class"].shape == (2, 64) and s["class"][:, 0].min() > s["class"][:, -1].max()  # falling variance
    assert not {"coset", "coord", "coord_last"} & set(s) and "coord.c0" in s
    y = pca.decode(Entropy().decode(Entropy().encode(s, info), info), info)
    y_plain = plain.decode(plain.encode(x, info), info)
    err, err_plain = ((y - x)[4:] ** 2).mean(), ((y_plain - x)[4:] ** 2).mean()
    assert err < 1.2 * err_plain
    assert len(Entropy().encode(s, info)) < 0.9 * len(Entropy().encode(plain.encode(x, info), info))
    np.testing.assert_array_equal(y[:4], x[:4].astype(np.float16).astype(np.float32))  # sinks as f16
    # too few cells for a basis to pay: none stored, and decode agrees
    small = _info(n=300)
    s_small = pca.encode(x[:300], small)
    assert "basis" not in s_small
    assert np.abs(pca.decode(s_small, small) - x[:300]).max() < 0.5 * np.abs(x).max()



@pytest.mark.parametrize("head_group", [1, 0])  # each head alone (a basis per head), both heads as one
def test_lattice_encode_leaves_its_input_alone_and_works_in_one_copy(head_group):
    """The lattice centres, scales and projects a copy of its input in place: the caller's
    values (float32, or float64 which a no-copy conversion would have handed in) are untouched,
    both give the same symbols, and the per-head projection is the one a product per head gives."""
    from nexus_gguf.stages.lattice import pca_basis, to_basis

    n = 600
    x = _correlated(n)
    info = dataclasses.replace(_info(n=n), query_energy=np.linspace(0.5, 2.0, 2 * 64).reshape(2, 64))
    lat = Lattice(k_bits=3.5, scale_scope="head", transform="pca", classes=True, pca_min_cells=500, head_group=head_group,
                  k_weights="queries")
    for values in (x, x.astype(np.float64)):
        kept = values.copy()
        s = lat.encode(values, info)
        np.testing.assert_array_equal(values, kept)
        assert "basis" in s and "channel_scale" in s and "mean" in s
        if values.dtype == np.float32:
            first = s
        else:
            assert first.keys() == s.keys() and all(np.array_equal(first[k], s[k]) for k in s)
    c = x.astype(np.float64) - x.mean(axis=0)
    basis = pca_basis(c, 8)
    want = np.stack([c[:, k, :] @ np.linalg.inv(basis[k] / 128.0) for k in range(2)], axis=1)
    np.testing.assert_array_equal(to_basis(c, basis, 8), want)


@pytest.mark.parametrize("head_group", [1, 0])  # each head alone, both heads as one vector
@pytest.mark.parametrize("backend", ["numpy", "numba", "native"])
def test_pca_decode_is_bit_identical_on_every_backend(backend, head_group, monkeypatch):
    if backend_status()[backend] != "available":
        pytest.skip(backend_status()[backend])
    from nexus_gguf import backends

    x, info = _correlated(300), _info(n=300)
    lat = Lattice(k_bits=3.0, scale_scope="head", head_group=head_group, transform="pca", classes=True, pca_min_cells=100)
    s = lat.encode(x, info)
    want = lat.decode(s, info)
    monkeypatch.setenv("NEXUS_GGUF_BACKEND", backend)
    backends._resolved.clear()
    try:
        got = lat.decode(s, info)
    finally:
        backends._resolved.clear()
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_basis_prune_leaves_out_weak_components_and_decodes_as_any_basis():
    """basis_prune (the writer's alone): components of mean square below it (in steps^2) are set
    to zero before quantizing, and the basis rows of those and of every component whose points
    came out zero are stored as zeros. A threshold below every component's changes no decoded
    value (only unused rows go) and costs fewer bytes; a higher one costs fewer still at a
    bounded error; the rows kept are the basis as before; the same decoder reads every file."""
    from nexus_gguf.stages.lattice import unused_components, weak_components

    n, h, d = 600, 1, 64
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((n, h, d)) * np.exp2(-np.arange(d) / 6.0)).astype(np.float32)  # a steep spectrum
    info = _info(n=n, h=h, d=d)
    kw = dict(k_bits=3.0, scale_scope="head", transform="pca", pca_min_cells=100, basis_bits=8, classes=True)
    symbols, sizes, errors, decoded = {}, {}, {}, {}
    for prune in (0.0, 1e-9, 0.25):
        s = symbols[prune] = Lattice(basis_prune=prune, **kw).encode(x, info)
        coded = Entropy().encode(s, info)
        decoded[prune] = Lattice(**kw).decode(Entropy().decode(coded, info), info)  # the option is the writer's alone
        sizes[prune], errors[prune] = len(coded), float(((decoded[prune] - x)[4:] ** 2).mean())
    zero_rows = {p: ~symbols[p]["basis"].any(axis=2) for p in symbols}
    assert not zero_rows[0.0].any() and 0 < zero_rows[1e-9].sum() < zero_rows[0.25].sum() < d
    np.testing.assert_array_equal(decoded[1e-9], decoded[0.0])
    assert sizes[0.25] < sizes[1e-9] < sizes[0.0], sizes
    assert errors[0.25] < 1.5 * errors[0.0], errors
    for p in (1e-9, 0.25):  # rows kept: the same basis
        kept = ~zero_rows[p]
        np.testing.assert_array_equal(symbols[p]["basis"][kept], symbols[0.0]["basis"][kept])
    # the parts: mean squares in steps, sinks aside; points zero in every cell that is not a sink
    y = np.zeros((5, 1, 16))
    y[:, 0, 3] = [9.0, 0.1, 0.1, 0.1, 0.1]  # large only in the sink row
    y[1:, 0, 5] = 2.0
    sink = np.array([True, False, False, False, False])
    weak = weak_components(y, np.full((5, 1), 2.0), sink, 0.5)
    assert weak[0, 3] and not weak[0, 5] and weak[0, 0]
    pts = (np.zeros((5, 2), np.uint8), np.zeros((5, 2, 7), np.int32), np.zeros((5, 2), np.int32))
    pts[1][0, 0, 2] = 4  # only in the sink: unused
    pts[1][3, 1, 6] = -1  # component 14, and through the parity the eighth (15)
    pts[2][3, 1] = 0
    unused = unused_components(pts, 5, 1, 16, sink)
    assert unused[0, 2] and not unused[0, 14] and not unused[0, 15] and unused[0, :8].all()
    half = (pts[0].copy(), pts[1], pts[2])
    half[0][2, 0] = 1  # the D8 + 1/2 coset: every coordinate of the group is nonzero
    assert not unused_components(half, 5, 1, 16, sink)[0, :8].any()
    # a head of zeros (its step zero): all of it left out, without dividing by the step
    two = np.zeros((n, 2, d), np.float32)
    two[:, 1] = x[:, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = Lattice(basis_prune=0.25, **kw).encode(two, _info(n=n, h=2, d=d))
    assert not s["basis"][0].any() and s["basis"][1].any()
    with pytest.raises(ConfigError):
        Lattice(basis_prune=-0.1)


def test_pca_and_classes_refuse_damaged_symbols():
    x, info = _correlated(300), _info(n=300)
    lat = Lattice(k_bits=3.0, scale_scope="head", transform="pca", classes=True, pca_min_cells=100)
    s = lat.encode(x, info)
    some_class = next(k for k in s if k.startswith("coord.c"))
    for bad in ({**s, "basis": s["basis"][:1]}, {**s, "basis": s["basis"] * 4},
                {**s, "class": s["class"][:, :8]}, {**s, "class": np.full_like(s["class"], 8)},
                {**s, "class": (s["class"] + 1) % 8},
                {k: v for k, v in s.items() if k != some_class}, {k: v for k, v in s.items() if k != "basis"},
                {**s, some_class: s[some_class][:-1]}):
        with pytest.raises(FormatError):
            lat.decode(bad, info)
    with pytest.raises(ConfigError):
        Lattice(transform="svd")
    with pytest.raises(ConfigError):
        Lattice(classes=True, scale_scope="vector")
    with pytest.raises(ConfigError):
        Lattice(classes=True, scale_scope="head", token_steps=0.5, step_octaves=16.0)  # too many streams
    with pytest.raises(ConfigError):
        Lattice(transform="pca", basis_bits=9)


def test_k_weights_scale_channels_by_the_queries_and_cut_their_error():
    """k_weights=queries: K's channels are divided by (query energy / mean)^-1/2 before the basis
    is fitted and the scales stored (f16), so the error moves to the channels the queries read
    least: the error each query sees (energy-weighted) drops at the same size; V and sections
    without a basis are coded as without the option; no energy (nothing captured) stores ones."""
    from dataclasses import replace

    from nexus_gguf.stages.lattice import channel_scales

    n, h, d = 600, 2, 64
    x, info = _correlated(n), _info(n=n)
    rng = np.random.default_rng(5)
    energy = np.repeat(rng.lognormal(0.0, 2.0, (h, d // 2)), 2, axis=1)  # RoPE pairs share theirs
    weighted = Lattice(k_bits=3.5, scale_scope="head", transform="pca", classes=True, pca_min_cells=500, k_weights="queries")
    plain = Lattice(k_bits=3.5, scale_scope="head", transform="pca", classes=True, pca_min_cells=500)
    with_energy = replace(info, query_energy=energy)
    s = weighted.encode(x, with_energy)
    scale = s["channel_scale"].view(np.float16).astype(np.float64)
    assert s["channel_scale"].shape == (h, d) and np.allclose(scale, (energy / energy.mean(axis=1, keepdims=True)) ** -0.5,
                                                              rtol=1e-3)
    y = weighted.decode(Entropy().decode(Entropy().encode(s, with_energy), info), info)  # decode needs no energy
    y_plain = plain.decode(plain.encode(x, info), info)

    def seen(err):  # the mean square error of q.k over queries with these channel energies
        return float((err[4:] ** 2 * energy[None]).mean())

    assert seen(y - x) < 0.8 * seen(y_plain - x)
    assert len(Entropy().encode(s, info)) < 1.1 * len(Entropy().encode(plain.encode(x, info), info))
    np.testing.assert_array_equal(y[:4], x[:4].astype(np.float16).astype(np.float32))  # sinks as they were
    assert "channel_scale" not in weighted.encode(x, replace(with_energy, kind="v", name="v.0.0.3"))
    assert "channel_scale" not in weighted.encode(x[:300], replace(_info(n=300), query_energy=energy))
    assert np.all(weighted.encode(x, info)["channel_scale"] == np.float16(1).view(np.uint16))  # nothing captured
    assert np.all(channel_scales(np.full((h, d), np.nan), h, d) == 1)
    for bad in ({k: v for k, v in s.items() if k != "channel_scale"}, {**s, "channel_scale": s["channel_scale"][:1]},
                {**s, "channel_scale": np.zeros_like(s["channel_scale"])},
                {**s, "channel_scale": np.full_like(s["channel_scale"], np.float16(np.inf).view(np.uint16))}):
        with pytest.raises(FormatError):
            weighted.decode(bad, info)
    with pytest.raises(ConfigError):
        Lattice(k_weights="queries")  # needs the basis
    with pytest.raises(ConfigError):
        Lattice(transform="pca", scale_scope="head", k_weights="keys")
    assert weighted.uses_queries and build_pipeline("high").needs_scores
    assert not build_pipeline("high", lattice_k_weights="none", lattice_token_steps=0.0).needs_scores


def test_k_weights_bits_refine_only_the_weighted_sections():
    """k_weights_bits: K's step is that many bits finer where its channels are weighted (K on a
    basis), and only there: V, and K sections too short for a basis, keep their bits; decode
    derives the same steps from what it knows."""
    from dataclasses import replace

    n, h, d = 600, 2, 64
    x, info = _correlated(n), _info(n=n)
    energy = np.ones((h, d))
    opts = dict(k_bits=3.0, scale_scope="head", transform="pca", pca_min_cells=500, k_weights="queries")
    finer, plain = Lattice(**opts, k_weights_bits=0.5), Lattice(**opts)
    k = replace(info, query_energy=energy)
    assert finer.bits(k) == 3.5 and plain.bits(k) == 3.0
    assert finer.bits(replace(k, kind="v", name="v.0.0.3")) == 3.0
    short = replace(_info(n=300), query_energy=energy)
    assert finer.bits(short) == 3.0
    a, b = finer.encode(x, k), plain.encode(x, k)
    np.testing.assert_array_equal(a["scale"], b["scale"])  # the same RMS stored, a finer step derived from it
    assert np.allclose(finer.group_steps(a["scale"], k), plain.group_steps(b["scale"], k) * 2.0**-0.5)
    y = finer.decode(Entropy().decode(Entropy().encode(a, k), info), info)
    y_plain = plain.decode(Entropy().decode(Entropy().encode(b, k), info), info)
    assert np.mean((y - x) ** 2) < 0.8 * np.mean((y_plain - x) ** 2)
    np.testing.assert_array_equal(finer.encode(x[:300], short)["coord"], plain.encode(x[:300], short)["coord"])
    with pytest.raises(ConfigError):
        Lattice(**{**opts, "k_bits": 11.9}, k_weights_bits=0.5)


def test_classes_combine_with_token_steps():
    n = 300
    x, info = _correlated(n), _info(n=n)
    importance = np.ones(n)
    importance[100:200] = 1 / 64
    with_imp = TensorInfo(**{**info.__dict__, "importance": importance})
    lat = Lattice(k_bits=3.5, scale_scope="head", classes=True, token_steps=0.5, step_octaves=3.0)
    s = lat.encode(x, with_imp)
    assert "coord.0.c7" in s or any(k.startswith("coord.6.c") for k in s)
    y = lat.decode(Entropy().decode(Entropy().encode(s, with_imp), info), info)
    assert np.array_equal(y, lat.decode(s, info))
    err = ((y - x) ** 2).mean(axis=(1, 2))
    assert err[100:200].mean() > 4 * err[4:100].mean()


def test_head_groups_code_a_layers_heads_as_one_vector():
    """head_group: the largest divisor of the head count up to the option (0: all) whose vector
    stays within 512 values; the streams take the group's shape (same memory order), and the
    values come back on every backend alike."""
    grouped = Lattice(k_bits=3.0, scale_scope="head", head_group=0, transform="pca", classes=True, pca_min_cells=100)
    assert grouped.heads_per_vector(_info(h=3, d=64)) == 3
    assert grouped.heads_per_vector(_info(h=8, d=128)) == 4  # 512 values at most
    assert grouped.heads_per_vector(_info(h=1, d=64)) == 1
    assert Lattice(scale_scope="head", head_group=3).heads_per_vector(_info(h=8, d=128)) == 2  # a divisor of 8
    assert Lattice(scale_scope="head", head_group=2).heads_per_vector(_info(h=3, d=64)) == 1
    assert Lattice(scale_scope="head", head_group=0).heads_per_vector(_info(h=2, d=512)) == 1  # one head is any size
    rng = np.random.default_rng(1)
    n, h, d = 2000, 3, 64  # enough cells for a 192 x 192 basis to pay
    mix = rng.standard_normal((h * d, h * d)) * np.exp(-np.arange(h * d) / 40.0)[:, None]  # heads correlated
    x = (rng.standard_normal((n, h * d)) @ mix).reshape(n, h, d).astype(np.float32)
    info = _info(n=n, h=h, d=d)
    s = grouped.encode(x, info)
    assert s["basis"].shape == (1, h * d, h * d) and s["class"].shape == (1, h * d) and s["scale"].shape == (1, 1)
    assert s["mean"].shape == (1, h * d) and s["sink"].shape == (4, 1, h * d)
    y = grouped.decode(Entropy().decode(Entropy().encode(s, info), info), info)
    assert y.shape == x.shape
    per_head = Lattice(k_bits=3.0, scale_scope="head", transform="pca", classes=True, pca_min_cells=100)
    sizes = [len(Entropy().encode(lat.encode(x, info), info)) for lat in (grouped, per_head)]
    err = [float(((lat.decode(lat.encode(x, info), info) - x)[4:] ** 2).mean()) for lat in (grouped, per_head)]
    assert sizes[0] < 0.9 * sizes[1] and err[0] < 1.05 * err[1]  # the cross-head correlation is used
    # without the basis (too few cells) the group still shares one step and one set of classes
    small = _info(n=60, h=h, d=d)
    s_small = grouped.encode(x[:60], small)
    assert "basis" not in s_small and s_small["scale"].shape == (1, 1)
    assert np.abs(grouped.decode(s_small, small) - x[:60]).max() < 0.5 * np.abs(x).max()
    for bad in ({**s, "basis": s["basis"].reshape(h, d, -1)[:, :, :d]}, {**s, "class": s["class"].reshape(h, d)}):
        with pytest.raises(FormatError):
            grouped.decode(bad, info)
    with pytest.raises(ConfigError):
        Lattice(head_group=0)  # needs one step per head (scale_scope head)
    with pytest.raises(ConfigError):
        Lattice(scale_scope="head", head_group=-1)


def test_stream_table_columns_are_the_c_parsers_record_fields():
    """entropy.REC_* index the rows nxkv_parse_streams writes (nxkv_stream_info, nxkv.h): each
    column at its field's offset, the row as wide as the struct."""
    from nexus_gguf.backends import backend_status
    from nexus_gguf.stages import entropy as e

    if backend_status()["native"] != "available":
        pytest.skip(f"native backend {backend_status()['native']}")
    from nexus_gguf.backends import native

    ffi, _ = native.load()
    assert ffi.sizeof("nxkv_stream_info") == 8 * e.N_RECORD_FIELDS == 8 * native._STREAM_FIELDS
    fields = {"name_offset": e.REC_NAME_AT, "name_size": e.REC_NAME_SIZE, "dtype": e.REC_DTYPE, "ndim": e.REC_NDIM,
              "shape": e.REC_SHAPE, "n": e.REC_N, "method": e.REC_METHOD, "payload_offset": e.REC_AT,
              "payload_size": e.REC_SIZE, "rans_ok": e.REC_RANS_OK, "lo": e.REC_LO, "freq0": e.REC_FREQ0,
              "n_freqs": e.REC_N_FREQS, "lanes": e.REC_LANES, "chunk": e.REC_CHUNK, "length0": e.REC_LENGTH0,
              "n_lengths": e.REC_N_LENGTHS, "body_offset": e.REC_BODY_AT, "body_size": e.REC_BODY_SIZE}
    for field, column in fields.items():
        assert ffi.offsetof("nxkv_stream_info", field) == 8 * column, field


def test_stream_container_fast_parse_agrees_with_the_reader():
    """Entropy.streams parses a section's stream records and rANS tables in C where the native
    backend runs (nxkv_parse_streams), else by plain indexing, and falls back to the
    bounds-checked reader where the bytes are not sound: on every truncation and on damaged
    bytes all give the same streams and rANS tables, or all refuse (FormatError)."""
    from nexus_gguf.backends import backend_name
    from nexus_gguf.stages.entropy import Entropy, StreamTable, _stream_table_native

    lanes, plain = Entropy(lanes=4, chunk=64), Entropy(lanes=1, chunk=0)
    info = TensorInfo("k.0.0.0", "f16", 2, 10**6)
    rng = np.random.default_rng(5)
    records = [lanes.stream_record("coord", rng.integers(0, 9, (40, 7)).astype(np.int32)),
               plain.stream_record("coset", rng.integers(0, 2, (40,)).astype(np.uint8)),
               lanes.stream_record("scale", rng.integers(-3, 3, 5).astype(np.int16)),
               lanes.stream_record("zero", np.zeros((0,), np.uint8)),
               plain.stream_record("empty", np.zeros((3, 0), np.int32))]
    data = np.frombuffer(bytes([len(records)]) + b"".join(records), np.uint8)

    def parsed(how, d):
        return golden.parsed_streams(how, d, info)

    variants = [data[:cut] for cut in range(len(data))] + [data, np.concatenate([data, data[:3]])]
    for _ in range(400):
        bad = data.copy()
        bad[rng.integers(0, len(data), int(rng.integers(1, 3)))] ^= rng.integers(1, 256, dtype=np.uint8)
        variants.append(bad)
    for at in range(0, len(data), 3):  # a run of zeros: a table refused after an earlier one was kept
        bad = data.copy()
        bad[at : at + 6] = 0
        variants.append(bad)
    native_used = 0
    for d in variants:
        assert parsed(lanes.streams, d) == parsed(lanes._streams_read, d)
        native_used += _stream_table_native(np.ascontiguousarray(d), info) is not None
        want = parsed(lanes._streams_read, d)
        if want != "refused":  # the table section_decode registers rANS streams from: the same streams
            assert golden.table_streams(lanes.stream_table(np.ascontiguousarray(d), info)) == golden.table_streams(
                StreamTable.of_streams(info, lanes._streams_read(d, info)))
    assert parsed(lanes.streams, data) != "refused"
    if backend_name() in ("native", "cuda"):
        assert _stream_table_native(data, info) is not None and native_used > 100


@pytest.mark.parametrize("kind", ["k", "v"])
def test_value_path_holds_a_few_copies_of_a_section_at_its_peak(kind):
    """A save encodes a layer per core while the state is still held: what one section's
    encoding holds at its peak is most of what a save adds. With `high`'s stages on a
    4096-cell section (RoPE removal, PCA, seven importance buckets, rdo, classes), the numpy
    memory at the peak stays within 5.5x the section's float32 values, which the pipeline lets
    go once the lattice has its float64 copy: that copy (2x), the points (1x), the rdo's rows,
    steps and rate tables (measured 5.1x; 8.0x for K and 7.0x for V before the steps worked in
    place and the inputs were let go)."""
    import tracemalloc

    from nexus_gguf.backends import backend_name

    if backend_name() != "native":
        pytest.skip("the Numba and numpy kernels allocate temporaries of their own")
    n, h, d = 4096, 3, 64
    rng = np.random.default_rng(3)
    lattice, entropy = (stage_from_config(dict(c)) for c in PRESETS["high"]["stages"][1:])
    pipeline = Pipeline([Rope(mode="norm", n_rot=64), lattice, entropy])
    info = dataclasses.replace(_info(kind, n=n, h=h, d=d), importance=rng.lognormal(0.0, 2.0, n),
                   query_energy=rng.uniform(0.5, 2.0, (h, d)) if kind == "k" else None)
    pipeline.encode_values(_values(n=n, h=h, d=d, seed=1).reshape(n, h * d), info)  # RoPE's angles, computed once a stream
    held = [_values(n=n, h=h, d=d).reshape(n, h * d)]
    values_bytes = held[0].nbytes
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        data = pipeline.encode_values(held.pop(), info)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert data.size < values_bytes / 2  # a lossy section was made
    assert peak <= 5.5 * values_bytes, f"{peak / values_bytes:.2f}x the section's values"
