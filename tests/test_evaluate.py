"""The eval's metric functions against hand-computed values, and small end-to-end evals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import DATA, open_llama

from nexus_gguf.cli import main
from nexus_gguf.errors import ConfigError
from nexus_gguf.evaluate import context_needed, continuation_metrics, evaluate, percentile
from nexus_gguf.report import frontier, markdown_table, text_table

REQUIRED = ["name", "text", "prefix_tokens", "ratio", "kld_mean", "kld_median", "kld_p99", "kld_max", "top1",
            "dp_mean", "dp_rms", "ppl_ratio", "save_seconds", "load_seconds", "prefill_seconds"]


def test_metrics_by_hand():
    # row 0: reference uniform over 3 tokens, candidate (0.5, 0.25, 0.25); target 0
    # row 1: reference favours token 0 (logit 2), candidate token 1; target 1
    ref = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    cand = np.array([[math.log(2), 0.0, 0.0], [0.0, 2.0, 0.0]])
    m = continuation_metrics(ref, cand, np.array([0, 1]))
    e2 = math.exp(2)
    hi, lo = e2 / (e2 + 2), 1 / (e2 + 2)
    kld0 = (math.log((1 / 3) / 0.5) + 2 * math.log((1 / 3) / 0.25)) / 3
    kld1 = hi * math.log(hi / lo) + lo * math.log(lo / hi)
    assert m["kld_mean"] == pytest.approx((kld0 + kld1) / 2)
    assert m["kld_median"] == pytest.approx((kld0 + kld1) / 2)
    assert m["kld_p99"] == pytest.approx(kld0 + 0.99 * (kld1 - kld0))
    assert m["kld_max"] == pytest.approx(kld1)
    assert m["top1"] == 0.5
    dp = [0.5 - 1 / 3, hi - lo]
    assert m["dp_mean"] == pytest.approx(sum(dp) / 2)
    assert m["dp_rms"] == pytest.approx(math.sqrt((dp[0] ** 2 + dp[1] ** 2) / 2))
    # PPL ratio: exp(mean NLL candidate - mean NLL reference) = exp(((ln 3 - ln 2) + (ln lo - ln hi) ... ) / 2)
    assert m["ppl_ratio"] == pytest.approx(math.exp(((math.log(2 / 3)) + math.log(lo / hi)) / 2))


def test_identical_logits_are_perfect():
    x = np.random.default_rng(0).standard_normal((7, 50)).astype(np.float32) * 5
    m = continuation_metrics(x, x.copy(), np.arange(7))
    assert m["kld_mean"] == m["kld_max"] == 0.0 and m["top1"] == 1.0 and m["ppl_ratio"] == 1.0 and m["dp_rms"] == 0.0


def test_percentile_is_llama_perplexitys():
    v = np.array([5.0, 1.0, 3.0, 2.0])
    assert percentile(v, 0.0) == 1.0 and percentile(v, 1.0) == 5.0
    assert percentile(v, 0.5) == pytest.approx(2.5)  # p = 1.5 between sorted[1] = 2 and sorted[2] = 3
    assert percentile(v, 0.99) == pytest.approx(3 + 0.97 * 2)


def test_frontier():
    pts = [(0.0, 1.0), (0.0, 1.1), (0.01, 3.5), (0.02, 2.9), (0.03, 3.6), (0.5, 3.0)]
    assert frontier(pts) == [(0.0, 1.1), (0.01, 3.5), (0.03, 3.6)]


@pytest.fixture(scope="module")
def eval_rows(smollm2_path, prompt_text):
    llm = open_llama(smollm2_path, n_ctx=context_needed([64, 96], 16))
    return evaluate(llm, prompt_text, text_name="prose", presets=["lossless"], prefix_tokens=[64, 96], eval_tokens=16,
                    ablate=["lossless"], recall_trials=1, recall_prefixes=[96])


def test_end_to_end_eval(eval_rows):
    rows = {(r["prefix_tokens"], r["name"]): r for r in eval_rows}
    names = ["raw", "zstd", "q8_0", "q8_0+hadamard", "q5_0", "q5_0+hadamard", "q4_0", "q4_0+hadamard",
             "lossless", "lossless-no-byteplane", "lossless-no-zstd"]
    assert [r["name"] for r in eval_rows] == names * 2
    for r in eval_rows:
        assert all(k in r for k in REQUIRED)
        assert r["stored_bytes"] > 0 and r["ratio"] == r["raw_bytes"] / r["stored_bytes"]
        assert r["save_seconds"] >= 0 and r["load_seconds"] > 0 and r["prefill_seconds"] > 0
    for n in (64, 96):
        raw = rows[(n, "raw")]
        # restoring the same bytes must give the same logits, or no figure here means anything
        assert raw["kld_max"] == 0.0 and raw["top1"] == 1.0 and raw["ppl_ratio"] == 1.0 and raw["ratio"] == 1.0
        for lossless in ("zstd", "lossless", "lossless-no-byteplane", "lossless-no-zstd"):
            assert rows[(n, lossless)]["kld_max"] == 0.0
        # .nxkv files also carry the tokens and the last logits row (~160 kB, as much as zstd
        # saves on states this short); byte planes alone cannot compress anything
        assert rows[(n, "zstd")]["ratio"] > 1.0
        assert rows[(n, "lossless-no-zstd")]["ratio"] < 1.0 < rows[(n, "lossless")]["ratio"] / rows[(n, "lossless-no-zstd")]["ratio"]
        for q in ("q8_0", "q4_0", "q4_0+hadamard"):
            assert rows[(n, q)]["kld_mean"] > 0
        assert rows[(n, "q8_0")]["ratio"] == pytest.approx(1.88, abs=0.02)  # 34 bytes per 32 values vs 64
        assert rows[(n, "q4_0")]["ratio"] == pytest.approx(3.55, abs=0.02)
    # recall ran at 96 tokens only; lossless storage finds what the raw state finds
    assert all(r["recall_trials"] is None for r in eval_rows if r["prefix_tokens"] == 64)
    rec = {r["name"]: r["recall_hits"] for r in eval_rows if r["prefix_tokens"] == 96}
    assert rec["raw"] == 1 and rec["lossless"] == rec["zstd"] == 1


def test_tables(eval_rows):
    text = text_table(eval_rows)
    assert "prose: 64-token prefix" in text and "q4_0+hadamard" in text
    md = markdown_table(eval_rows)
    assert md.count("| candidate |") == 2 and "| `lossless` |" in md and "1/1" in md


def test_eval_refuses_short_text(smollm2_path):
    llm = open_llama(smollm2_path, n_ctx=256)
    with pytest.raises(ConfigError, match="tokens"):
        evaluate(llm, "far too short", prefix_tokens=[64], eval_tokens=16)


def test_cli_eval_writes_json_and_plot(smollm2_path, tmp_path, capsys):
    out, png = tmp_path / "rows.json", tmp_path / "pareto.png"
    args = ["eval", smollm2_path, f"{DATA}/prose.txt", "--prefix-tokens", "48", "--eval-tokens", "8",
            "--presets", "lossless", "--no-baselines", "--recall-trials", "0", "--threads", "2",
            "--json", str(out), "--plot", str(png)]
    assert main(args) == 0
    assert "lossless" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["raw", "lossless"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", smollm2_path, f"{DATA}/prose.txt", "--presets", "nope", "--prefix-tokens", "48"]) == 1
    assert "unknown preset" in capsys.readouterr().err
