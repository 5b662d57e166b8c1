"""The lossy presets on real llama.cpp states: RoPE removal matches llama.cpp's own rotation,
restored states continue with a small, measured quality cost, in every cache layout."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import layer0_keys, open_llama, prompt_tokens

from nexus_gguf import load_state, read_info, save_state
from nexus_gguf import llama_bridge as bridge
from nexus_gguf.cli import main
from nexus_gguf.errors import ChecksumError, ConfigError, FormatError
from nexus_gguf.evaluate import continuation_metrics
from nexus_gguf.llama_state import parse_state
from nexus_gguf.stages import ModelBinding, TensorInfo
from nexus_gguf.stages.rope import Rope

GGML_Q8_0 = 8


def _rope_free_layer0(llm, tokens):
    """Layer 0's K with RoPE removed, [n_cells, n_head_kv, head_dim], and the cells' positions.
    Layer 0 sees nothing but the token itself, so equal tokens must give equal rows."""
    k, pos, sliding = layer0_keys(llm, tokens)
    rope = Rope().bind(ModelBinding(bridge.model_facts(llm), bridge.context_facts(llm, rope=True)))
    info = TensorInfo("k", "f16", 2, 0, kind="k", positions=pos, model_layer=0, sliding=sliding,
                      n_cells=k.shape[0], n_heads=k.shape[1], head_dim=k.shape[2])
    return rope, rope.encode(k, info), k, pos


def _repeats(tokens, positions):
    by_token = {}
    for cell, pos in enumerate(positions):
        by_token.setdefault(tokens[pos], []).append(cell)
    return [cells for cells in by_token.values() if len(cells) > 1]


def test_rope_removal_matches_llama_norm(smollm2_path, prompt_text):
    llm = open_llama(smollm2_path)
    tokens = prompt_tokens(llm, prompt_text, 200)
    rope, free, k, pos = _rope_free_layer0(llm, tokens)
    assert rope.mode == "norm" and rope.freq_base == 100000.0
    groups = _repeats(tokens, pos)
    assert len(groups) > 10
    for cells in groups:
        scale = np.abs(free[cells[0]]).max()
        assert np.abs(free[cells] - free[cells[0]]).max() < 0.01 * scale  # f16 storage only
        assert np.abs(k[cells] - k[cells[0]]).max() > 0.05 * scale or len(cells) < 2  # rotated in the cache


def test_rope_removal_matches_llama_neox_sliding(gemma3_path):
    llm = open_llama(gemma3_path, n_ctx=256)
    tokens = [2] + [5, 9, 5, 7, 9, 5, 11, 7] * 3  # repeats inside the 8-token window
    rope, free, k, pos = _rope_free_layer0(llm, tokens)
    assert rope.mode == "neox" and rope.freq_base_swa == 10000.0 and rope.freq_base == 1e6
    groups = _repeats(tokens, pos)
    assert groups
    for cells in groups:
        scale = np.abs(free[cells[0]]).max()
        assert np.abs(free[cells] - free[cells[0]]).max() < 0.01 * scale
    # and the global layers' base would not line them up: the sliding base is really used
    cfg = {k: v for k, v in rope.get_config().items() if k != "id"}
    wrong = Rope(**{**cfg, "freq_base_swa": rope.freq_base})
    info = TensorInfo("k", "f16", 2, 0, kind="k", positions=pos, sliding=True, n_cells=k.shape[0], n_heads=k.shape[1],
                      head_dim=k.shape[2])
    off = wrong.encode(k, info)
    assert max(np.abs(off[c] - off[c[0]]).max() for c in groups) > 0.05 * np.abs(off).max()


def _continuation_kld(llm_factory, path, tokens, n):
    """Mean KLD and top-1 agreement of the next tokens after restoring `path` vs after the raw state."""
    llm = llm_factory()
    llm.eval(tokens[:n])
    raw = bridge.get_seq_state(llm, 0)
    bridge.clear_seq(llm, 0)
    bridge.set_seq_state(llm, raw, 0)
    ref = bridge.eval_logits(llm, tokens[n:-1], n)
    other = llm_factory()
    load_state(other, path)
    got = bridge.eval_logits(other, tokens[n:-1], n)
    return continuation_metrics(ref, got, np.asarray(tokens[n + 1 :]))


@pytest.mark.parametrize("layout", ["f16 V transposed", "f16 flash attention", "q8_0 cache"])
def test_high_preset_restores_every_cache_layout(smollm2_path, prompt_text, tmp_path, layout):
    kw = {"f16 V transposed": dict(flash_attn=False), "f16 flash attention": dict(flash_attn=True),
          "q8_0 cache": dict(flash_attn=True, type_k=GGML_Q8_0, type_v=GGML_Q8_0)}[layout]
    factory = lambda: open_llama(smollm2_path, **kw)  # noqa: E731
    llm = factory()
    tokens = prompt_tokens(llm, prompt_text, 233)
    llm.eval(tokens[:200])
    path = tmp_path / "high.nxkv"
    report = save_state(llm, path, "high")
    # 200 tokens: the logits row is a large part of the file; a q8_0 cache is half the size to start with
    assert report.ratio > (1.5 if layout == "q8_0 cache" else 2.5)
    info = read_info(path)
    assert info["logits"]["dtype"] == "f16" and info["state"]["values"]["head_dim_k"] == 64
    assert info["state"]["values"]["llama_rot_k"] == 64  # llama.cpp's rotation for 64-wide heads
    m = _continuation_kld(factory, path, tokens, 200)
    assert m["kld_mean"] < 0.05 and m["top1"] > 0.8
    lr = load_state(factory(), path)
    assert not lr.exact and lr.logits is not None


# the E8 error at b bits is about 0.27 * 2^(2.05 - b) of the values' RMS: 0.10 at 3.5 bits, 0.19 at 2.6 (their
# rate-distortion quantization adds a few percent)
@pytest.mark.parametrize("preset, max_error", [("high", 0.12), ("balanced", 0.24)])
def test_lossy_iswa_restore_continues(gemma3_path, tmp_path, preset, max_error):
    """The iSWA layout (a base cache and a sliding-window one) through the lossy path. The tiny
    random model barely uses its cache (continuation KLD ~1e-12), so the restored cache itself
    is compared with the saved one: every cache and layer comes back, at the preset's error.
    The presets' importance-aware steps make the cells attended to least up to 2^3 coarser: the
    cells at the median importance and above (half of them at least) keep the preset's step, so
    the median cell's error is the preset's, the worst cell's at most 8 times that."""
    factory = lambda: open_llama(gemma3_path, n_ctx=256, swa_full=False)  # noqa: E731
    llm = factory()
    llm.eval([2] + list(range(10, 70)))
    facts = bridge.model_facts(llm)
    saved = parse_state(bridge.get_seq_state(llm, 0), "sequence", facts.state_layout())
    save_state(llm, tmp_path / "g.nxkv", preset)
    other = factory()
    load_state(other, tmp_path / "g.nxkv")
    restored = parse_state(bridge.get_seq_state(other, 0), "sequence", facts.state_layout())
    assert [c.name for c in restored.caches] == ["base", "swa"]
    for (cache, _, a), (_, _, b) in zip(saved.layers(), restored.layers()):
        keep = np.isin(cache.streams[0].cells.pos, next(c for c in restored.caches if c.name == cache.name).streams[0].cells.pos)
        for kind in ("k", "v"):
            x, y = a.values(kind)[keep], b.values(kind)
            err = np.sqrt(np.mean((x - y) ** 2, axis=1) / np.mean((x - x.mean(axis=0)) ** 2))  # per cell
            assert 0 < np.median(err) < max_error and err.max() < 8 * max_error, (cache.name, a.model_layer, kind, err)
    other.eval([71, 72])  # and llama.cpp continues at the next position
    assert other.n_tokens == 63


def test_damaged_lossy_file_is_refused(smollm2_path, prompt_text, tmp_path):
    """Damage the CRCs catch, and damage they cannot see (a section cut short and the file
    re-packed with fresh CRCs, as a buggy writer would): both refused before llama.cpp is
    touched."""
    from nexus_gguf import format as fmt

    llm = open_llama(smollm2_path)
    llm.eval(prompt_tokens(llm, prompt_text, 64))
    path = tmp_path / "b.nxkv"
    save_state(llm, path, "balanced")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    (tmp_path / "flipped.nxkv").write_bytes(bytes(data))
    f = fmt.NxkvFile.open(path)
    sections = [(n, bytes(f.section(n))[: -7 if n == "v.0.0.12" else None]) for n in f.names()]
    fmt.write_atomic(tmp_path / "short.nxkv", fmt.pack(f.header, sections))
    target = open_llama(smollm2_path)
    with pytest.raises(ChecksumError):
        load_state(target, tmp_path / "flipped.nxkv")
    with pytest.raises(FormatError, match="v.0.0.12"):
        load_state(target, tmp_path / "short.nxkv")
    assert target.n_tokens == 0


def test_overrides_and_without(smollm2_path, prompt_text, tmp_path):
    llm = open_llama(smollm2_path)
    llm.eval(prompt_tokens(llm, prompt_text, 64))
    fine = save_state(llm, tmp_path / "a.nxkv", "high", lattice_k_bits=6.0, lattice_v_bits=6.0)
    coarse = save_state(llm, tmp_path / "b.nxkv", "high", without=["rope"])
    assert fine.file_bytes > coarse.file_bytes
    assert "rope" not in [s["id"] for s in read_info(tmp_path / "b.nxkv")["pipeline"]["stages"]]
    with pytest.raises(ConfigError):
        save_state(llm, tmp_path / "c.nxkv", "lossless", without=["rope"])


def test_cli_save_state_with_overrides(smollm2_path, tmp_path, prompt_text, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text(prompt_text[:400], encoding="utf-8")
    args = ["save-state", smollm2_path, str(prompt), "--preset", "high", "--k-bits", "5", "--set", "lattice.sinks=2",
            "--no", "rope", "--threads", "2"]
    assert main(args) == 0
    info = read_info(prompt.with_suffix(".nxkv"))
    lat = next(s for s in info["pipeline"]["stages"] if s["id"] == "lattice")
    assert lat["k_bits"] == 5.0 and lat["sinks"] == 2 and info["pipeline"]["stages"][0]["id"] != "rope"
    assert main(["save-state", smollm2_path, str(prompt), "--set", "lattice.k_bits"]) == 1
