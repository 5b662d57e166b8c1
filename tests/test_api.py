"""save_state / load_state / read_info end to end on the real model, and every way a bad file
is refused without touching the Llama."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from conftest import decode_into, logits_now, open_llama, prompt_tokens

import nexus_gguf as ng
from nexus_gguf import format as fmt
from nexus_gguf import llama_bridge as bridge
from nexus_gguf.llama_state import parse_state

N_PROMPT = 40


@pytest.fixture(scope="module")
def saved(smollm2_path, prompt_text, tmp_path_factory):
    """A prompt evaluated once; its raw llama-cpp-python state and its .nxkv file."""
    llm = open_llama(smollm2_path, logits_all=True)
    toks = prompt_tokens(llm, prompt_text, N_PROMPT)
    llm.eval(toks)
    path = tmp_path_factory.mktemp("states") / "prompt.nxkv"
    report = ng.save_state(llm, path, preset="lossless")
    return {"tokens": toks, "raw": llm.save_state(), "path": path, "report": report,
            "last_logits": np.array(llm.scores[N_PROMPT - 1])}


def test_report_and_info(saved):
    r = saved["report"]
    assert r.n_tokens == N_PROMPT and r.file_bytes == saved["path"].stat().st_size
    assert r.raw_bytes > N_PROMPT * 30 * 2 * 384  # at least the f16 K and V rows of 30 layers
    assert r.ratio == r.raw_bytes / r.file_bytes
    assert set(r.seconds) == {"state_get", "parse", "encode", "write"}  # and "scoring" when evicting
    info = ng.read_info(saved["path"], verify=True)
    assert info["prompt"]["n_tokens"] == N_PROMPT
    assert info["model"]["arch"] == "llama" and info["model"]["n_layer"] == 30
    assert info["pipeline"]["preset"] == "lossless"
    assert info["file_bytes"] == r.file_bytes and info["verified"]
    assert info["raw"]["bytes"] == r.raw_bytes


def test_lossless_continuation_is_bit_identical(smollm2_path, saved):
    cont = [1, 504, 2443, 314, 253, 1435, 30, 486]  # arbitrary token ids as the continuation
    ref = open_llama(smollm2_path, logits_all=True)
    ref.load_state(saved["raw"])  # the restore of the raw llama.cpp state is the reference
    ref.eval(cont)
    llm = open_llama(smollm2_path, logits_all=True)
    report = ng.load_state(llm, saved["path"])
    assert report.exact and report.n_tokens == N_PROMPT
    assert llm.n_tokens == N_PROMPT and list(llm.input_ids[:N_PROMPT]) == saved["tokens"]
    assert np.array_equal(llm.scores[N_PROMPT - 1], saved["last_logits"])  # stored logits put back
    llm.eval(cont)
    n = N_PROMPT + len(cont)
    assert np.array_equal(llm.scores[N_PROMPT:n], ref.scores[N_PROMPT:n])


def test_cli_generate_matches_direct_prompt(smollm2_path, saved, capsys):
    from nexus_gguf.cli import main

    direct = open_llama(smollm2_path)
    want = direct.create_completion(prompt=saved["tokens"], max_tokens=16, temperature=0)["choices"][0]["text"]
    assert main(["generate", smollm2_path, str(saved["path"]), "-n", "16", "--threads", "2"]) == 0
    got = capsys.readouterr().out
    assert got == want + "\n" and len(want) > 0


def _busy_llama(path, prompt):
    """A Llama holding another prompt, with the logits it gives for a fixed next token."""
    llm = open_llama(path)
    return llm, _make_busy(llm, prompt)


def _make_busy(llm, prompt):
    """`llm` made to hold `prompt`; returns the logits it gives for a fixed next token."""
    llm.eval(prompt)
    raw = llm.save_state()
    llm.eval([42])
    expect = logits_now(llm)
    llm.load_state(raw)
    return expect


def _assert_untouched(llm, prompt, expect):
    assert llm.n_tokens == len(prompt) and list(llm.input_ids[: len(prompt)]) == prompt
    llm.eval([42])
    assert np.array_equal(logits_now(llm), expect)


def test_damaged_files_never_touch_the_llama(smollm2_path, saved, tmp_path):
    data = saved["path"].read_bytes()
    other = [1, 9, 8, 7, 6, 5]
    llm, expect = _busy_llama(smollm2_path, other)
    header_end = 20 + struct.unpack_from("<Q", data, 12)[0] + 4
    positions = sorted(set(range(0, header_end, max(1, header_end // 40))) | set(range(header_end, len(data), max(1, len(data) // 60))) | {len(data) - 1})
    bad = tmp_path / "bad.nxkv"
    for i in positions:
        d = bytearray(data)
        d[i] ^= 0x10
        bad.write_bytes(bytes(d))
        with pytest.raises(ng.FormatError):
            ng.load_state(llm, bad)
    for n in (0, 7, 20, header_end - 1, header_end + 10, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:n])
        with pytest.raises(ng.FormatError):
            ng.load_state(llm, bad)
    _assert_untouched(llm, other, expect)


def test_newer_format_version(smollm2_path, saved, tmp_path):
    d = bytearray(saved["path"].read_bytes())
    d[8:12] = struct.pack("<I", fmt.FORMAT_VERSION + 1)
    (tmp_path / "v.nxkv").write_bytes(bytes(d))
    llm, expect = _busy_llama(smollm2_path, [1, 2, 3])
    with pytest.raises(ng.UnsupportedVersionError):
        ng.load_state(llm, tmp_path / "v.nxkv")
    _assert_untouched(llm, [1, 2, 3], expect)


def test_file_from_another_model(smollm2_path, gemma3_path, saved, tmp_path):
    g = open_llama(gemma3_path, n_ctx=128)
    g.eval(g.tokenize(b"hello there", add_bos=False))
    ng.save_state(g, tmp_path / "g.nxkv")
    llm, expect = _busy_llama(smollm2_path, [1, 2, 3])
    # both sides named, and what differs
    with pytest.raises(ng.ModelMismatchError, match=r"saved from tiny-gemma3\.gguf .*the loaded model is SmolLM2-135M.*arch gemma3 vs llama"):
        ng.load_state(llm, tmp_path / "g.nxkv")
    _assert_untouched(llm, [1, 2, 3], expect)
    with pytest.raises(ng.ModelMismatchError, match=r"saved from SmolLM2-135M.*the loaded model is tiny-gemma3\.gguf"):
        ng.load_state(g, saved["path"])


def test_too_small_a_context_is_refused_before_llama(smollm2_path, saved):
    small = open_llama(smollm2_path, n_ctx=32)
    with pytest.raises(ng.RestoreError, match=f"a context of at least {N_PROMPT} tokens; this Llama holds 32"):
        ng.load_state(small, saved["path"])
    assert small.n_tokens == 0
    expect = _make_busy(small, [1, 2, 3])  # a Llama in use keeps its prompt and its next logits
    with pytest.raises(ng.RestoreError, match="this Llama holds 32"):
        ng.load_state(small, saved["path"])
    _assert_untouched(small, [1, 2, 3], expect)


def test_a_failed_conversion_or_stream_move_leaves_the_llama_as_it_was(smollm2_path, saved, monkeypatch):
    """The steps between decoding and llama.cpp (conversion to the context's cache types and V
    layout, the move into the target sequence's stream) fail before the Llama is touched."""
    llm, expect = _busy_llama(smollm2_path, [1, 2, 3])

    def fails(*args, **kwargs):
        raise ng.FormatError("injected failure")

    for step in ("_in_target_layout", "_into_stream"):
        with monkeypatch.context() as m:
            m.setattr(ng.api, step, fails)
            with pytest.raises(ng.FormatError, match="injected failure"):
                ng.load_state(llm, saved["path"])
        _assert_untouched(llm, [1, 2, 3], expect)
        llm.n_tokens -= 1  # _assert_untouched evaluated one more token: back to the prompt alone


def test_llama_refusal_rolls_back(smollm2_path, saved, monkeypatch):
    # Skip the conversion to the context's V layout so that llama.cpp itself refuses (V
    # transposition differs): the Llama must come back as it was.
    monkeypatch.setattr(ng.api, "_in_target_layout", lambda llm, state, blob: [blob])
    llm, expect = _busy_llama(smollm2_path, [1, 2, 3, 4])
    llm2 = open_llama(smollm2_path, flash_attn=True)
    expect2 = _make_busy(llm2, [1, 2, 3, 4])
    with pytest.raises(ng.RestoreError, match="left as before"):
        ng.load_state(llm2, saved["path"])
    _assert_untouched(llm2, [1, 2, 3, 4], expect2)


def test_iswa_lossless_restore(gemma3_path, tmp_path):
    toks = open_llama(gemma3_path, n_ctx=256).tokenize(b"sliding windows keep only the recent cells. " * 3, add_bos=False)
    a = open_llama(gemma3_path, n_ctx=256, swa_full=False)
    a.eval(toks)
    ng.save_state(a, tmp_path / "g.nxkv", preset="lossless")
    a.eval([65, 66])
    want = logits_now(a)
    b = open_llama(gemma3_path, n_ctx=256, swa_full=False)
    assert ng.load_state(b, tmp_path / "g.nxkv").exact
    b.eval([65, 66])
    assert np.array_equal(logits_now(b), want)


def test_presets_and_overrides(smollm2_path, tmp_path):
    llm = open_llama(smollm2_path)
    with pytest.raises(ng.NxkvError, match="no evaluated tokens"):
        ng.save_state(llm, tmp_path / "x.nxkv")
    llm.eval([1, 2, 3])
    with pytest.raises(ng.ConfigError, match="unknown preset 'nope'"):
        ng.save_state(llm, tmp_path / "x.nxkv", preset="nope")
    with pytest.raises(ng.ConfigError, match="no option"):
        ng.save_state(llm, tmp_path / "x.nxkv", preset="lossless", zstd_window=3)
    with pytest.raises(ng.ConfigError, match="has no 'zstd' stage"):
        ng.save_state(llm, tmp_path / "x.nxkv", zstd_level=3)  # the default preset, high, codes with rANS
    assert ng.save_state(llm, tmp_path / "d.nxkv").preset == "high"
    r = ng.save_state(llm, tmp_path / "x.nxkv", preset="lossless", zstd_level=19)
    assert ng.read_info(tmp_path / "x.nxkv")["pipeline"]["stages"][-1] == {"id": "zstd", "level": 19}
    assert r.n_tokens == 3


@pytest.mark.parametrize("target", ["f16 flash attention", "q8_0", "q4_0", "q8_0 K, f16 V"])
def test_restore_into_other_cache_types(smollm2_path, prompt_text, tmp_path, target):
    """A state saved from an f16 cache with V transposed restores into a context with other
    cache types or flash attention: converted on the way in, at no more than the target type's
    own cost (against the source context continuing: what that context costs reading the prompt
    itself), and back again."""
    from conftest import prompt_tokens

    from nexus_gguf.evaluate import continuation_metrics

    kw = {"f16 flash attention": dict(flash_attn=True), "q8_0": dict(flash_attn=True, type_k=8, type_v=8),
          "q4_0": dict(flash_attn=True, type_k=2, type_v=2), "q8_0 K, f16 V": dict(flash_attn=False, type_k=8)}[target]
    src = open_llama(smollm2_path, flash_attn=False)
    tokens = prompt_tokens(src, prompt_text, 161)
    src.eval(tokens[:128])
    ng.save_state(src, tmp_path / "s.nxkv", "lossless")
    direct = open_llama(smollm2_path, **kw)
    direct.eval(tokens[:128])
    dst = open_llama(smollm2_path, **kw)
    report = ng.load_state(dst, tmp_path / "s.nxkv")
    assert report.converted and not report.exact and dst.n_tokens == 128
    if target == "f16 flash attention":  # f16 to f16: only V's layout changes, not one value
        layout = bridge.model_facts(src).state_layout()
        a = parse_state(bridge.get_seq_state(src, 0), "sequence", layout)
        b = parse_state(bridge.get_seq_state(dst, 0), "sequence", layout)
        for (_, _, x), (_, _, y) in zip(a.layers(), b.layers()):
            assert x.v_trans and not y.v_trans
            assert np.array_equal(x.k, y.k) and np.array_equal(x.values("v"), y.values("v"))
    ref = bridge.eval_logits(src, tokens[128:160], 128)
    own = continuation_metrics(ref, bridge.eval_logits(direct, tokens[128:160], 128), np.asarray(tokens[129:161]))
    m = continuation_metrics(ref, bridge.eval_logits(dst, tokens[128:160], 128), np.asarray(tokens[129:161]))
    # the converted state against the target context's own cost (flash attention's arithmetic:
    # ~0.003; q8_0 ~0.004; q4_0 ~0.06, where its rounding of f32 and of f16 values differ as much
    # as either from f16: a comparison with that context itself failed on CPUs without AVX-512)
    assert m["kld_mean"] <= 1.5 * own["kld_mean"] + 0.005, (m, own)
    assert m["top1"] >= own["top1"] - 1 / 32 and m["top1"] >= 0.8, (m, own)
    bridge.clear_seq(dst, 0)  # and back: that cache's state into an f16 one with V transposed
    ng.load_state(dst, tmp_path / "s.nxkv")
    ng.save_state(dst, tmp_path / "b.nxkv", "lossless")
    home = open_llama(smollm2_path, flash_attn=False)
    assert ng.load_state(home, tmp_path / "b.nxkv").converted and home.n_tokens == 128


def _two_sequence_llama(path):
    """A Llama whose context holds two sequences (llama-cpp-python makes one-sequence contexts)."""
    from llama_cpp import _internals

    llm = open_llama(path, n_ctx=512)
    llm.context_params.n_seq_max = 2
    llm._ctx = _internals.LlamaContext(model=llm._model, params=llm.context_params, verbose=False)
    return llm


def test_any_sequence_into_any_sequence(smollm2_path, prompt_text, tmp_path):
    """Sequence 1 of a two-sequence context saved, restored into sequence 1 of another and into
    the only sequence of a plain Llama: the same cells and bytes each time."""
    src = _two_sequence_llama(smollm2_path)
    a, b = src.tokenize(prompt_text[:200].encode()), src.tokenize(prompt_text[300:420].encode())
    decode_into(src._ctx.ctx, a, 0)
    decode_into(src._ctx.ctx, b, 1)
    with pytest.raises(ng.ConfigError, match="tokens"):
        ng.save_state(src, tmp_path / "s1.nxkv", "lossless", seq_id=1)
    ng.save_state(src, tmp_path / "s1.nxkv", "lossless", seq_id=1, tokens=b)
    assert ng.read_info(tmp_path / "s1.nxkv")["prompt"]["n_tokens"] == len(b)
    dst = _two_sequence_llama(smollm2_path)
    decode_into(dst._ctx.ctx, a, 0)
    report = ng.load_state(dst, tmp_path / "s1.nxkv", seq_id=1)
    assert report.exact and list(report.tokens) == b and dst.n_tokens == 0  # the Llama's own sequence 0 untouched
    assert bridge.get_seq_state(dst, 1) == bridge.get_seq_state(src, 1)
    assert bridge.get_seq_state(dst, 0) == bridge.get_seq_state(src, 0)
    plain = open_llama(smollm2_path)
    ng.load_state(plain, tmp_path / "s1.nxkv")  # sequence 1 into sequence 0
    assert plain.n_tokens == len(b) and list(plain.input_ids[: len(b)]) == b
    # the same cells and rows, in the one stream of the plain context
    layout = bridge.model_facts(plain).state_layout()
    (x,), (y,) = ([s for s in parse_state(bridge.get_seq_state(ll, q), "sequence", layout).caches[0].streams if s]
                  for ll, q in ((src, 1), (plain, 0)))
    assert np.array_equal(x.cells.pos, y.cells.pos)
    assert all(np.array_equal(u.k, w.k) and np.array_equal(u.v, w.v) for u, w in zip(x.layers, y.layers))


@pytest.mark.llama
def test_another_quantization_of_the_same_model_is_refused_naming_both(tmp_path):
    """Same architecture, shapes and seed, F16 against Q8_0 matrices: the state is refused before
    llama.cpp is touched, and the message names both files and both weight types."""
    from tiny_models import write_tiny_model

    f16 = write_tiny_model(tmp_path / "tiny-f16.gguf", matrix_type="F16")
    q8 = write_tiny_model(tmp_path / "tiny-q8_0.gguf", matrix_type="Q8_0")
    saver = open_llama(f16, n_ctx=128)
    saver.eval(saver.tokenize(b"hello there, general", add_bos=False))
    ng.save_state(saver, tmp_path / "f16.nxkv", "lossless")
    llm, expect = _busy_llama(q8, [5, 6, 7])
    with pytest.raises(ng.ModelMismatchError) as e:
        ng.load_state(llm, tmp_path / "f16.nxkv")
    message = str(e.value)
    for part in ("tiny-f16.gguf", "tiny-q8_0.gguf", "F16 instead of Q8_0 weights", "another quantization"):
        assert part in message, message
    _assert_untouched(llm, [5, 6, 7], expect)


def test_llama_refusal_after_reset_leaves_a_usable_empty_llama(smollm2_path, saved, monkeypatch):
    """A Llama that holds no prompt (reset(): llama-cpp-python keeps the stale cells, its next
    eval drops them) is not copied for a roll-back; when llama.cpp refuses, it is still empty
    and reads a prompt as a fresh one does."""
    monkeypatch.setattr(ng.api, "_in_target_layout", lambda llm, state, blob: [blob])
    fresh = open_llama(smollm2_path, flash_attn=True)
    fresh.eval([5, 6, 7])
    want = logits_now(fresh)
    llm = open_llama(smollm2_path, flash_attn=True)
    llm.eval([1, 2, 3, 4])
    llm.reset()
    with pytest.raises(ng.RestoreError, match="left as before"):
        ng.load_state(llm, saved["path"])
    assert llm.n_tokens == 0
    llm.eval([5, 6, 7])
    assert np.array_equal(logits_now(llm), want)
