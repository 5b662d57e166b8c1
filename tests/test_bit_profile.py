"""Bit profiles: the offsets from measured sensitivities, the profile files and where save_state
finds them, and what a bound profile does to the lattice's steps (decoders need nothing of it)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from nexus_gguf import bit_profile
from nexus_gguf.bit_profile import MAX_OFFSET, BitProfile, offsets
from nexus_gguf.errors import ConfigError
from nexus_gguf.pipeline import PRESETS, Pipeline, stage_from_config
from nexus_gguf.stages import ModelBinding, TensorInfo
from nexus_gguf.stages.lattice import Lattice

FP = "ab" * 32


def _facts(n_layer=4, fingerprint=FP):
    return SimpleNamespace(fingerprint=fingerprint, n_layer=n_layer, name="tiny", file_name="tiny.gguf")


def _profile(k=(0.0, 0.0, 0.0, 0.0), v=(0.0, 0.0, 0.0, 0.0), fingerprint=FP):
    return BitProfile(fingerprint, "tiny", tuple(k), tuple(v), {"text": "t"})


def test_offsets_keep_the_predicted_kld_and_favour_sensitive_sections():
    added = [0.004, 0.0001, 0.0002, 0.001, -0.0003, 0.0]
    off = offsets(added)
    assert off[0] == max(off) and off[0] > 0  # the most sensitive gets the most bits
    assert off[4] == off[5] == min(off) < 0  # measured as nothing (or noise below it): the floor
    assert all(abs(o) <= MAX_OFFSET and o * 8 == int(o * 8) for o in off)  # 1/8 bits, bounded
    # a section's share of the KLD falls as 2^(-2 bits): the sum stays the uniform one (within
    # the 1/8-bit rounding) while the mean offset is negative, i.e. fewer bits in all
    s = np.maximum(added, 0) + 0.5 * np.maximum(added, 0).mean()
    assert abs((s * np.exp2(-2 * np.asarray(off))).sum() / s.sum() - 1) < 0.1
    assert np.mean(off) < 0
    assert offsets([0.0, 0.0, -1e-4]) == [0.0, 0.0, 0.0]  # nothing measured: uniform


def test_offsets_are_clipped_to_one_bit():
    off = offsets([1.0] + [1e-9] * 40)
    assert off[0] == MAX_OFFSET and min(off) >= -MAX_OFFSET


def test_profile_json_round_trip_and_validation(tmp_path):
    p = _profile(k=(0.25, -0.5, 0.0, 1.0), v=(-1.0, 0.125, 0.0, 0.0))
    path = bit_profile.write(p, tmp_path / "sub" / "p.json")
    assert bit_profile.read(path) == p
    assert p.extra_bits("k", 1) == -0.5 and p.extra_bits("v", 0) == -1.0
    assert p.extra_bits("k", None) == 0.0 and p.extra_bits("k", 9) == 0.0 and p.extra_bits("raw", 0) == 0.0
    bad = [
        {**p.to_json(), "version": 99},
        {**p.to_json(), "k_bits": [0.0, 0.0]},  # not one per layer for both
        {**p.to_json(), "v_bits": [0.0, 0.0, 3.0, 0.0]},  # beyond a bit
        {**p.to_json(), "k_bits": [0.0, float("nan"), 0.0, 0.0]},
        {k: v for k, v in p.to_json().items() if k != "fingerprint"},
        [1, 2],
    ]
    for data in bad:
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(ConfigError):
            bit_profile.read(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read"):
        bit_profile.read(tmp_path / "broken.json")


def test_find_looks_in_the_environment_the_user_directory_then_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXUS_GGUF_PROFILE_DIR", str(tmp_path / "user"))
    monkeypatch.delenv("NEXUS_GGUF_BIT_PROFILE", raising=False)
    facts = _facts()
    assert bit_profile.find(facts) is None
    mine = _profile(k=(0.5, 0, 0, 0))
    bit_profile.write(mine, tmp_path / "user" / f"{FP}.json")
    assert bit_profile.find(facts) == mine
    assert bit_profile.find(_facts(n_layer=5)) is None  # same name, another shape: not used
    monkeypatch.setenv("NEXUS_GGUF_BIT_PROFILE", "none")
    assert bit_profile.find(facts) is None
    other = bit_profile.write(_profile(fingerprint="cd" * 32), tmp_path / "other.json")
    monkeypatch.setenv("NEXUS_GGUF_BIT_PROFILE", other)
    with pytest.raises(ConfigError, match="another model"):
        bit_profile.find(facts)


def test_packaged_profiles_are_valid():
    paths = sorted(bit_profile.PACKAGED.glob("*.json"))
    assert paths, "the embedded model's profile is shipped"
    for path in paths:
        p = bit_profile.read(path)
        assert path.stem == p.fingerprint and p.source.get("text")
        # a profile spends what it gains on size: fewer bits on the whole than uniform
        assert np.mean(p.k_bits + p.v_bits) < 0


def _section(kind="v", layer=2, n=600, h=3, d=64, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, h, d)) * np.linspace(3, 0.1, d) + rng.standard_normal((1, h, d))).astype(np.float32)
    info = TensorInfo(f"{kind}.0.0.{layer}", "f16", 2, n * h * d * 8, kind=kind, positions=np.arange(n, dtype=np.int32),
                      model_layer=layer, n_cells=n, n_heads=h, head_dim=d)
    return x, info


@pytest.mark.parametrize("preset", ["high", "max"])
def test_a_bound_profile_moves_the_stored_scale_and_nothing_else(preset):
    config = next(c for c in PRESETS[preset]["stages"] if c["id"] == "lattice")
    plain = stage_from_config(config)
    profile = _profile(v=(0.0, 0.0, 1.0, 0.0), k=(0.0, 0.0, -0.5, 0.0))
    bound = plain.bind(ModelBinding(None, {}, profile))
    assert bound.get_config() == plain.get_config()  # the file's options are the same
    assert "bit profile" in bound.note and plain.profile is None and not plain.note
    for kind, extra in (("v", 1.0), ("k", -0.5)):
        x, info = _section(kind)
        a, b = plain.encode(x, info), bound.encode(x, info)
        assert (b["scale"].astype(int) == a["scale"].astype(int) - int(8 * extra)).all()
        # a reader decodes it with the options alone, at the finer (coarser) step
        ya, yb = plain.decode(a, info), plain.decode(b, info)
        ea, eb = np.sqrt(np.mean((ya - x) ** 2)), np.sqrt(np.mean((yb - x) ** 2))
        assert eb / ea == pytest.approx(2.0 ** -extra, rel=0.25)
    x, info = _section("v", layer=1)  # a layer the profile leaves alone
    a, b = plain.encode(x, info), bound.encode(x, info)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_profile_is_bound_only_to_log_scales_and_kept_off_the_gpu_encoder():
    seed = stage_from_config(next(c for c in PRESETS["seed"]["stages"] if c["id"] == "lattice"))
    assert seed.bind(ModelBinding(None, {}, _profile())).profile is None  # f16 scales: no exact place for it
    from nexus_gguf.calibrate import calibrate
    from nexus_gguf.pipeline import build_pipeline

    assert {p for p in PRESETS if build_pipeline(p).takes_bit_profile} == {"high", "balanced", "max"}
    with pytest.raises(ConfigError, match="no stage whose bits"):
        calibrate(None, "text", preset="seed")  # refused before the model is touched
    from nexus_gguf.cuda_encode import unsupported
    from nexus_gguf.stages.entropy import Entropy
    from nexus_gguf.stages.rope import Rope

    lat = Lattice(scale_scope="head").bind(ModelBinding(None, {}, _profile()))
    pipe = Pipeline([Rope(mode="off"), lat, Entropy(lanes=4)])
    why = unsupported(pipe, {"head_dim_k": 64, "head_dim_v": 64}, {"f16"})
    assert why is not None and "bit profile" in why


# ---------------------------------------------------------------- with the real model


def test_save_state_uses_the_models_profile(smollm2_path, prompt_text, tmp_path, monkeypatch):
    from conftest import open_llama, prompt_tokens

    from nexus_gguf import llama_bridge as bridge
    from nexus_gguf import load_state, read_info, save_state

    monkeypatch.delenv("NEXUS_GGUF_BIT_PROFILE", raising=False)
    monkeypatch.setenv("NEXUS_GGUF_PROFILE_DIR", str(tmp_path / "none-here"))
    llm = open_llama(smollm2_path)
    llm.eval(prompt_tokens(llm, prompt_text, 200))
    facts = bridge.model_facts(llm)
    shipped = bit_profile.find(facts)
    assert shipped is not None and shipped.fits(facts)  # the embedded model's, from the package
    sizes = {}
    for name, choice in (("auto", "auto"), ("none", None), ("coarse", _profile(k=(-1.0,) * facts.n_layer, v=(-1.0,) * facts.n_layer,
                                                                          fingerprint=facts.fingerprint))):
        path = tmp_path / f"{name}.nxkv"
        report = save_state(llm, path, "high", bit_profile=choice)
        sizes[name] = report.file_bytes
        notes = read_info(path).get("notes") or {}
        assert ("bit profile" in notes.get("lattice", "")) == (choice is not None)
        assert report.bit_profile == ("" if choice is None else facts.fingerprint[:12])
    assert save_state(llm, tmp_path / "lossless.nxkv", "lossless").bit_profile is None  # nothing takes one
    assert sizes["coarse"] < sizes["auto"] < sizes["none"]
    load_state(llm, tmp_path / "auto.nxkv")  # readers need nothing of the profile
    assert llm.n_tokens == 200
    with pytest.raises(ConfigError, match="another model"):
        save_state(llm, tmp_path / "other.nxkv", "high", bit_profile=_profile())
    assert not (tmp_path / "other.nxkv").exists()


def test_save_state_names_calibrate_where_a_model_has_no_profile(smollm2_path, tmp_path, capsys, monkeypatch):
    from nexus_gguf.cli import main

    (tmp_path / "p.txt").write_text("A short prompt about lighthouses and the sea. " * 4)
    monkeypatch.setattr(bit_profile, "PACKAGED", tmp_path / "nothing-shipped")
    monkeypatch.setenv("NEXUS_GGUF_PROFILE_DIR", str(tmp_path / "nothing-here"))
    monkeypatch.delenv("NEXUS_GGUF_BIT_PROFILE", raising=False)
    assert main(["save-state", smollm2_path, str(tmp_path / "p.txt"), "--threads", "2"]) == 0
    assert "nexus-gguf calibrate" in capsys.readouterr().err
    monkeypatch.setenv("NEXUS_GGUF_BIT_PROFILE", "none")  # asked for: no hint
    assert main(["save-state", smollm2_path, str(tmp_path / "p.txt"), "--threads", "2"]) == 0
    assert "calibrate" not in capsys.readouterr().err


def test_calibrate_measures_every_layer(smollm2_path, tmp_path, capsys):
    """The command line end to end (tiny settings: 61 saves and restores of 96 tokens)."""
    import os

    from conftest import DATA

    from nexus_gguf.cli import main

    out = tmp_path / "p.json"
    args = ["calibrate", smollm2_path, os.path.join(DATA, "prose.txt"), "--tokens", "96", "--eval-tokens", "24",
            "--threads", "2", "-o", str(out)]
    assert main(args) == 0
    assert "written to" in capsys.readouterr().out
    p = bit_profile.read(out)
    assert p.fits(SimpleNamespace(fingerprint=p.fingerprint, n_layer=30)) and len(p.source["kld_added"]) == 60
    added = np.array(list(p.source["kld_added"].values()))
    assert np.isfinite(added).all() and added.max() > 0  # a bit coarser somewhere costs something
    assert p.source["base_kld"] > 0 and np.mean(p.k_bits + p.v_bits) <= 0 and p.source["text"] == "prose.txt"
    (tmp_path / "short.txt").write_text("Too short to measure anything.")
    assert main(args[:2] + [str(tmp_path / "short.txt")] + args[3:]) == 1
    err = capsys.readouterr().err.strip()
    assert "tokens" in err and len(err.splitlines()) == 1


def test_calibrate_refuses_a_model_whose_output_does_not_move(gemma3_path):
    """The tiny random-weight Gemma 3 (iSWA: both caches coded with the profile's sections):
    its output barely depends on the cache, so no profile is made of the noise."""
    from conftest import open_llama

    from nexus_gguf.calibrate import calibrate
    from nexus_gguf.errors import NxkvError

    llm = open_llama(gemma3_path, n_ctx=512)
    text = " ".join(f"word{i % 97} token{i % 13}" for i in range(800))
    with pytest.raises(NxkvError, match="nothing to measure"):
        calibrate(llm, text, n_tokens=256, eval_tokens=32)
