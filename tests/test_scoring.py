"""Query capture through llama.cpp's eval callback, attention importance, and eviction."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import open_llama, prompt_tokens

from nexus_gguf import llama_bridge as bridge
from nexus_gguf import load_state, read_info, save_state
from nexus_gguf.backends import backend_status
from nexus_gguf.errors import NxkvError
from nexus_gguf.evaluate import continuation_metrics
from nexus_gguf.llama_state import parse_state
from nexus_gguf.stages import TensorInfo
from nexus_gguf.eviction import Eviction
from nexus_gguf.stages.rope import Rope
from nexus_gguf import scoring

N, W = 160, 32


@pytest.fixture(scope="module")
def prompt(smollm2_path, prompt_text):
    llm = open_llama(smollm2_path)
    tokens = prompt_tokens(llm, prompt_text, N + 17)
    llm.eval(tokens[:N])
    return llm, tokens, bridge.get_seq_state(llm, 0)


def test_captured_queries_are_the_models(prompt, smollm2_path):
    """Layer 0's queries recomputed from the GGUF weights: RMS norm, W_q, RoPE (NORM)."""
    import gguf

    llm, tokens, blob = prompt
    q = scoring.capture_queries(llm, blob, tokens[:N], W)
    assert sorted(q) == list(range(30)) and q[0].shape == (W, 9, 64)
    reader = gguf.GGUFReader(smollm2_path)
    t = {x.name: x for x in reader.tensors}
    deq = lambda name: gguf.quants.dequantize(t[name].data, t[name].tensor_type).astype(np.float64)  # noqa: E731
    eps = float(reader.fields["llama.attention.layer_norm_rms_epsilon"].parts[-1][0])
    x = deq("token_embd.weight")[tokens[N - W : N]]
    x = x / np.sqrt((x**2).mean(axis=1, keepdims=True) + eps) * deq("blk.0.attn_norm.weight")
    want = (x @ deq("blk.0.attn_q.weight").T).reshape(W, 9, 64).astype(np.float32)
    pos = np.arange(N - W, N, dtype=np.int32)
    want = Rope(mode="norm", n_rot=64, freq_base=100000.0).decode(want, TensorInfo("q", "f32", 4, 0, kind="k", positions=pos))
    # llama.cpp multiplies by the Q4_1 weights with Q8 activations: agreement to about 1%
    assert np.abs(q[0] - want).max() < 0.02 * np.abs(want).max()
    assert np.corrcoef(q[0].ravel(), want.ravel())[0, 1] > 0.9999


def test_native_and_ctypes_callbacks_agree(prompt):
    if backend_status()["native"] != "available":
        pytest.skip(backend_status()["native"])
    llm, tokens, blob = prompt
    a = scoring.capture_queries(llm, blob, tokens[:N], W, impl="native")
    b = scoring.capture_queries(llm, blob, tokens[:N], W, impl="ctypes")
    assert all(np.array_equal(a[layer], b[layer]) for layer in a)


def test_attention_importance_by_hand():
    # one query head, two keys: logits 0 and ln 3 -> weights 1/4, 3/4; a key after the query is masked
    q = np.array([[[1.0, 0.0]]])
    k = np.array([[[0.0, 0.0]], [[np.log(3), 0.0]], [[50.0, 0.0]]])
    imp = scoring.attention_importance(q, np.array([1]), k, np.array([0, 1, 2]), 1.0)
    np.testing.assert_allclose(imp, [0.25, 0.75, 0.0])
    # GQA: two query heads share the single KV head, so the mass doubles
    q2 = np.concatenate([q, q], axis=1)
    np.testing.assert_allclose(scoring.attention_importance(q2, np.array([1]), k, np.array([0, 1, 2]), 1.0), [0.5, 1.5, 0.0])


def test_choose_protects_sinks_and_window():
    pos = np.arange(100)
    imp = np.linspace(1, 0, 100)  # early tokens matter most
    keep = Eviction(keep=0.3, sinks=4, window=10).choose(imp, pos)
    assert keep.size == 30 and set(range(4)) <= set(keep) and set(range(90, 100)) <= set(keep)
    assert set(keep) - set(range(4)) - set(range(90, 100)) == set(range(4, 20))
    assert Eviction(keep=5.0, sinks=4, window=10).choose(imp, pos).size == 14  # never below the protected cells


def test_real_attention_scores(prompt):
    llm, tokens, blob = prompt
    state = parse_state(blob, "sequence", bridge.model_facts(llm).state_layout())
    s = scoring.score_cells(llm, blob, state, tokens[:N], W, "attention")
    assert s.scorer == "attention" and s.importance.shape == (N,) and s.importance.sum() == pytest.approx(1.0)
    assert s.importance.argmax() == 0  # the first token is the attention sink
    p = scoring.score_cells(llm, blob, state, tokens[:N], W, "key-proxy")
    assert p.scorer == "key-proxy" and not np.allclose(p.importance, s.importance)


@pytest.mark.parametrize("flash_attn", [False, True])
def test_evicted_state_restores_and_continues(smollm2_path, prompt_text, tmp_path, flash_attn):
    llm = open_llama(smollm2_path, flash_attn=flash_attn)
    tokens = prompt_tokens(llm, prompt_text, N + 17)
    llm.eval(tokens[:N])
    path = tmp_path / "b.nxkv"
    report = save_state(llm, path, "max", evict_keep=0.5)
    assert report.seconds["scoring"] > 0
    info = read_info(path)
    ev, sc = info["eviction"], info["scoring"]
    assert sc["used"] == sc["scorer"] == "attention" and sc["window"] == 32 and not sc["note"]
    assert ev["kept"] == N // 2 and ev["n_cells"] == N and ev["keep"] == 0.5
    assert [s["id"] for s in info["pipeline"]["stages"]] == ["rope", "lattice", "entropy"]
    assert report.eviction == ev and report.scoring == sc
    assert info["prompt"]["n_pos"] == N
    other = open_llama(smollm2_path, flash_attn=flash_attn)
    load_state(other, path)
    blob = bridge.get_seq_state(other, 0)
    cells = parse_state(blob, "sequence", bridge.model_facts(other).state_layout()).caches[0].streams[0].cells
    assert len(cells) == N // 2 and cells.pos[0] == 0 and cells.pos[-1] == N - 1
    # the next tokens go at positions N.. and llama.cpp accepts them
    got = bridge.eval_logits(other, tokens[N : N + 16], N)
    raw = bridge.get_seq_state(llm, 0)
    bridge.clear_seq(llm, 0)
    assert bridge.set_seq_state(llm, raw, 0)
    ref = bridge.eval_logits(llm, tokens[N : N + 16], N)
    m = continuation_metrics(ref, got, np.asarray(tokens[N + 1 : N + 17]))
    assert m["kld_mean"] < 0.5 and m["top1"] >= 0.5


def test_capture_failure_falls_back_to_the_proxy_and_says_so(smollm2_path, prompt_text, tmp_path, monkeypatch):
    llm = open_llama(smollm2_path)
    llm.eval(prompt_tokens(llm, prompt_text, 80))

    def broken(*a, **k):
        raise scoring.NxkvError("no queries")

    monkeypatch.setattr(scoring, "capture_queries", broken)
    with pytest.warns(RuntimeWarning, match="key-key proxy"):
        save_state(llm, tmp_path / "p.nxkv", "max")
    sc = read_info(tmp_path / "p.nxkv")["scoring"]
    assert sc["used"] == "key-proxy" and sc["scorer"] == "attention" and "no queries" in sc["note"]


def test_iswa_eviction_leaves_the_window_cache(gemma3_path, tmp_path):
    llm = open_llama(gemma3_path, n_ctx=256)
    tokens = [2] + list(range(10, 90))
    llm.eval(tokens)
    facts = bridge.model_facts(llm)
    before = parse_state(bridge.get_seq_state(llm, 0), "sequence", facts.state_layout())
    save_state(llm, tmp_path / "g.nxkv", "max")
    other = open_llama(gemma3_path, n_ctx=256)
    load_state(other, tmp_path / "g.nxkv")
    after = parse_state(bridge.get_seq_state(other, 0), "sequence", facts.state_layout())
    kept = after.caches[0].streams[0].cells.pos
    # a quarter of 81 is less than the protected cells: the 4 sinks and the 32-token window stay
    assert list(kept) == list(range(4)) + list(range(len(tokens) - 32, len(tokens)))
    assert np.array_equal(after.caches[1].streams[0].cells.pos, before.caches[1].streams[0].cells.pos)
    other.eval([91, 92])
    assert other.n_tokens == len(tokens) + 2


def _assert_restores_close(prompt, path, model_path):
    """A fresh Llama restored from `path` continues the prompt close to the raw state (16 tokens)."""
    llm, tokens, _ = prompt
    other = open_llama(model_path)
    load_state(other, path)
    got = bridge.eval_logits(other, tokens[N : N + 16], N)
    raw = bridge.get_seq_state(llm, 0)
    bridge.clear_seq(llm, 0)
    assert bridge.set_seq_state(llm, raw, 0)
    ref = bridge.eval_logits(llm, tokens[N : N + 16], N)
    bridge.clear_seq(llm, 0)  # leave the shared prompt as the fixture made it
    assert bridge.set_seq_state(llm, raw, 0)
    m = continuation_metrics(ref, got, np.asarray(tokens[N + 1 : N + 17]))
    assert m["kld_mean"] < 0.1 and m["top1"] >= 0.75


def test_importance_aware_steps_end_to_end(prompt, tmp_path, smollm2_path):
    """high (importance-aware steps): scores computed (nothing evicted), buckets stored, the
    file restores anywhere without the scores, and it is smaller than high with one step for all.
    Below step_min_cells (high: 1024) nothing is scored and the file is the one-step file."""
    llm, tokens, _ = prompt
    plain = save_state(llm, tmp_path / "plain.nxkv", "high", lattice_token_steps=0.0)
    short = save_state(llm, tmp_path / "short.nxkv", "high")
    assert short.scoring is None and short.file_bytes == plain.file_bytes
    report = save_state(llm, tmp_path / "steps.nxkv", "high", lattice_step_min_cells=0)
    assert report.scoring["used"] == "attention" and report.eviction is None and report.seconds["scoring"] > 0
    assert report.file_bytes < plain.file_bytes
    info = read_info(tmp_path / "steps.nxkv")
    assert info["scoring"] == report.scoring and info["prompt"]["n_pos"] == N
    _assert_restores_close(prompt, tmp_path / "steps.nxkv", smollm2_path)


def test_query_energy_sums_rope_pairs_over_each_kv_heads_group():
    """query_energy: mean square over the window and the query heads of each KV head, then the
    two channels of each RoPE pair share their sum (NORM pairs 2i, 2i+1; NEOX i, i + n_rot/2;
    channels past n_rot alone)."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    q = rng.standard_normal((5, 4, 8))  # [W, n_head, d]; 2 KV heads of 2 query heads each
    e = (q**2).mean(axis=0).reshape(2, 2, 8).mean(axis=1)
    norm = scoring.query_energy({3: q}, SimpleNamespace(n_head=4, n_head_kv=2, rope={"type": "norm", "n_rot": 6}))[3]
    np.testing.assert_allclose(norm[:, 0], e[:, 0] + e[:, 1])
    np.testing.assert_allclose(norm[:, 1], e[:, 0] + e[:, 1])
    np.testing.assert_allclose(norm[:, 6:], e[:, 6:])  # past n_rot: as they are
    neox = scoring.query_energy({3: q}, SimpleNamespace(n_head=4, n_head_kv=2, rope={"type": "neox", "n_rot": 8}))[3]
    np.testing.assert_allclose(neox[:, 1], e[:, 1] + e[:, 5])
    np.testing.assert_allclose(neox[:, 5], e[:, 1] + e[:, 5])


def test_k_weighted_by_the_queries_end_to_end(prompt, tmp_path, smollm2_path):
    """high with lattice.k_weights=queries: the last window's queries are captured (nothing is
    evicted, no importance computed), each K section stores its channel scales, the file restores
    anywhere without them, and the continuation stays close."""
    from nexus_gguf.format import NxkvFile
    from nexus_gguf.stages.entropy import Entropy

    llm, tokens, _ = prompt
    report = save_state(llm, tmp_path / "w.nxkv", "high", lattice_k_weights="queries", lattice_pca_min_cells=64)
    assert report.scoring["used"] == "attention" and report.eviction is None and report.seconds["scoring"] > 0
    f = NxkvFile.open(tmp_path / "w.nxkv")
    for section in f.names():
        if section.startswith(("k.", "v.")):
            data = np.frombuffer(bytes(f.section(section)), np.uint8)
            got = {st.name for st in Entropy().streams(data, TensorInfo(section, "f16", 2, 1 << 30))}
            assert ("channel_scale" in got) == section.startswith("k."), section
    _assert_restores_close(prompt, tmp_path / "w.nxkv", smollm2_path)
    # a state too short for a basis has no section to weight: nothing is captured (without
    # high's importance-aware steps, which would)
    short = save_state(llm, tmp_path / "s.nxkv", "high", lattice_token_steps=0.0)
    assert short.scoring is None and "scoring" not in short.seconds


def test_bounded_capture_holds_the_sinks_and_the_last_cells(prompt):
    """K's weights and the steps' importance take the queries from a capture context of the
    first cells and the last `context` ones (positions kept): the window's queries come out in
    the same shape, close to the whole state's, and a context as large as the state is the
    whole state."""
    llm, tokens, blob = prompt
    state = parse_state(blob, "sequence", bridge.model_facts(llm).state_layout())
    kept, n_ctx = scoring.bounded_capture(state, W, 64)
    pos = kept.caches[0].streams[0].cells.pos
    assert list(pos) == list(range(scoring.SINK_CELLS)) + list(range(N - 64, N)) and n_ctx == 256
    assert scoring.bounded_capture(state, W, N) == (None, None)
    whole = scoring.score_cells(llm, blob, state, tokens[:N], W, "attention", importance=False, energy=True)
    bounded = scoring.score_cells(llm, blob, state, tokens[:N], W, "attention", importance=False, energy=True, context=64)
    assert not bounded.note and sorted(bounded.query_energy) == sorted(whole.query_energy)
    dev = [np.abs(np.log2(bounded.query_energy[k] / whole.query_energy[k])).mean() for k in whole.query_energy]
    assert 0 < np.median(dev) < 0.25, dev  # a mean over 32 queries: moved a little, not replaced
    # importance for steps (not exact): the same bounded capture, the attention over every cell
    exact = scoring.score_cells(llm, blob, state, tokens[:N], W, "attention")
    steps = scoring.score_cells(llm, blob, state, tokens[:N], W, "attention", context=64, exact_importance=False)
    assert not steps.note and steps.importance.shape == exact.importance.shape == (N,)
    assert np.corrcoef(np.log(steps.importance), np.log(exact.importance))[0, 1] > 0.9
    assert not np.array_equal(steps.importance, exact.importance)
    assert bridge.get_seq_state(llm, 0) == blob


def test_reconstruction_scorer(prompt, tmp_path):
    """KVzip-style scores: the model repeats the prompt (in chunks, here two) in a side context;
    every cell gets a score, the file says which scorer ran, and the Llama is untouched."""
    llm, tokens, blob = prompt
    state = parse_state(blob, "sequence", bridge.model_facts(llm).state_layout())
    s = scoring.score_cells(llm, blob, state, tokens[:N], W, "reconstruct", chunk=96, stride=2)
    assert s.scorer == "reconstruct" and not s.note and s.importance.shape == (N,)
    assert np.all(s.importance > 0) and s.importance.max() <= 1.0
    # repeating the text attends to every token in turn: no cell is left at the floor the
    # last-window scorer leaves most cells at
    window = scoring.score_cells(llm, blob, state, tokens[:N], W, "attention").importance
    assert np.median(s.importance) / s.importance.max() > 10 * np.median(window) / window.max()
    report = save_state(llm, tmp_path / "r.nxkv", "max", evict_keep=0.5, score_scorer="reconstruct", score_chunk=96)
    assert report.scoring["used"] == "reconstruct" and report.eviction["kept"] == N // 2
    assert bridge.get_seq_state(llm, 0) == blob  # scoring ran beside the Llama, not in it


def test_reconstruction_scorer_over_each_chunks_span(prompt, tmp_path, monkeypatch):
    """With `span`, each chunk is repeated after the sinks, the span cells before it and itself
    (a side context of a few chunks, not the state, handed over as a sequence state file that is
    deleted afterwards, or from memory where none can be made): every cell is still scored, by
    the repeat of its own chunk, much as over the whole prompt; the Llama is untouched."""
    llm, tokens, blob = prompt
    state = parse_state(blob, "sequence", bridge.model_facts(llm).state_layout())
    whole = scoring.score_cells(llm, blob, state, tokens[:N], W, "reconstruct", chunk=48, stride=2, span=0).importance
    local = scoring.score_cells(llm, blob, state, tokens[:N], W, "reconstruct", chunk=48, stride=2, span=32,
                                spool_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(scoring.tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(OSError("read-only")))
    in_memory = scoring.score_cells(llm, blob, state, tokens[:N], W, "reconstruct", chunk=48, stride=2, span=32)
    assert np.array_equal(in_memory.importance, local.importance)
    assert local.scorer == "reconstruct" and not local.note and local.importance.shape == (N,)
    assert np.all(local.importance > 0) and local.importance.max() <= 1.0
    assert not np.array_equal(local.importance, whole)
    assert np.corrcoef(np.log(local.importance), np.log(whole))[0, 1] > 0.8
    # a span that leaves nothing out is the whole prompt's scoring
    same = scoring.score_cells(llm, blob, state, tokens[:N], W, "reconstruct", chunk=48, stride=2, span=N)
    assert np.array_equal(same.importance, whole)
    assert bridge.get_seq_state(llm, 0) == blob


def test_a_capture_reads_its_cells_from_a_sequence_state_file_as_from_memory(prompt, tmp_path):
    """The bounded capture hands its cells to llama.cpp as a sequence state file (read a layer
    at a time): the same queries as from the blob in memory; a damaged file is refused with
    NxkvError (the save then goes on without the capture, as when llama.cpp gives none)."""
    import llama_cpp

    from nexus_gguf.llama_state import write_sequence_file, write_state

    llm, tokens, blob = prompt
    state = parse_state(blob, "sequence", bridge.model_facts(llm).state_layout())
    kept, n_ctx = scoring.bounded_capture(state, W, 64)
    path = tmp_path / "kept.bin"
    with open(path, "wb") as f:
        n = write_sequence_file(f, kept, llama_cpp.LLAMA_STATE_SEQ_MAGIC, llama_cpp.LLAMA_STATE_SEQ_VERSION)
    assert n == path.stat().st_size == 12 + len(write_state(kept)) - 8  # without the blob's own magic and id
    from_file = scoring.capture_queries(llm, str(path), tokens[:N], W, n_ctx=n_ctx)
    from_memory = scoring.capture_queries(llm, write_state(kept), tokens[:N], W, n_ctx=n_ctx)
    assert sorted(from_file) == sorted(from_memory)
    for layer in from_file:
        assert np.array_equal(from_file[layer], from_memory[layer])
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], b"\0\0\0\0" + data[4:]):
        path.write_bytes(damaged)
        with pytest.raises(NxkvError, match="refused"):
            scoring.capture_queries(llm, str(path), tokens[:N], W, n_ctx=n_ctx)
