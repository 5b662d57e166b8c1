"""llama.cpp's own session and slot files: compress to .nxkv and back, byte for byte, on files
that llama.cpp itself writes and reads."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from conftest import open_llama, prompt_tokens

from nexus_gguf import read_info
from nexus_gguf.cli import main
from nexus_gguf.errors import FormatError
from nexus_gguf.llama_files import read_llama_file

N = 40


def _tokens_array(tokens):
    import llama_cpp

    return (llama_cpp.llama_token * len(tokens))(*tokens)


def _write_with_llama(llm, path, kind, tokens):
    import llama_cpp

    if kind == "session":
        assert llama_cpp.llama_state_save_file(llm._ctx.ctx, str(path).encode(), _tokens_array(tokens), len(tokens))
    else:
        assert llama_cpp.llama_state_seq_save_file(llm._ctx.ctx, str(path).encode(), 0, _tokens_array(tokens), len(tokens))


def _read_with_llama(llm, path, kind) -> list[int]:
    import llama_cpp

    out = (llama_cpp.llama_token * 4096)()
    n = ctypes.c_size_t(0)
    if kind == "session":
        assert llama_cpp.llama_state_load_file(llm._ctx.ctx, str(path).encode(), out, 4096, ctypes.byref(n))
    else:
        assert llama_cpp.llama_state_seq_load_file(llm._ctx.ctx, str(path).encode(), 0, out, 4096, ctypes.byref(n)) > 0
    return list(out[: n.value])


@pytest.mark.parametrize("kind", ["session", "slot"])
@pytest.mark.parametrize("flash_attn", [False, True])
def test_lossless_round_trip_is_byte_identical(smollm2_path, prompt_text, tmp_path, kind, flash_attn, capsys):
    llm = open_llama(smollm2_path, flash_attn=flash_attn)
    tokens = prompt_tokens(llm, prompt_text, N)
    llm.eval(tokens)
    original = tmp_path / f"p.{kind}"
    _write_with_llama(llm, original, kind, tokens)
    assert read_llama_file(original).kind == kind and read_llama_file(original).tokens.tolist() == tokens
    packed = tmp_path / "p.nxkv"
    assert main(["compress", smollm2_path, str(original), "-o", str(packed), "--preset", "lossless", "--threads", "2"]) == 0
    assert read_info(packed)["prompt"]["n_tokens"] == N
    back = tmp_path / f"back.{kind}"
    assert main(["decompress", smollm2_path, str(packed), "-o", str(back), "--format", kind, "--threads", "2"]) == 0
    assert back.read_bytes() == original.read_bytes()
    assert "nexus-gguf: error" not in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["session", "slot"])
def test_lossy_files_load_in_llama(smollm2_path, prompt_text, tmp_path, kind):
    """A `high` .nxkv written back as a session or slot file is one llama.cpp itself loads, and
    the prompt continues as after the original file."""
    from nexus_gguf import llama_bridge as bridge
    from nexus_gguf.evaluate import continuation_metrics

    llm = open_llama(smollm2_path)
    tokens = prompt_tokens(llm, prompt_text, 3 * N + 17)
    llm.eval(tokens[: 3 * N])
    original = tmp_path / f"p.{kind}"
    _write_with_llama(llm, original, kind, tokens[: 3 * N])
    assert main(["compress", smollm2_path, str(original), "-o", str(tmp_path / "p.nxkv"), "--threads", "2"]) == 0
    assert main(["decompress", smollm2_path, str(tmp_path / "p.nxkv"), "-o", str(tmp_path / f"b.{kind}"), "--format", kind]) == 0
    results = []
    for path in (original, tmp_path / f"b.{kind}"):
        fresh = open_llama(smollm2_path)
        assert _read_with_llama(fresh, path, kind) == tokens[: 3 * N]
        results.append(bridge.eval_logits(fresh, tokens[3 * N : 3 * N + 16], 3 * N))
    m = continuation_metrics(results[0], results[1], np.asarray(tokens[3 * N + 1 : 3 * N + 17]))
    assert 0 < m["kld_mean"] < 0.05 and m["top1"] >= 0.8


def test_other_files_are_refused_clearly(tmp_path):
    bad = tmp_path / "x.session"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(FormatError, match="not a llama.cpp session or slot file"):
        read_llama_file(bad)
    bad.write_bytes((0x6767736E).to_bytes(4, "little") + (9).to_bytes(4, "little") + bytes(8))
    with pytest.raises(FormatError, match="session file of version 9"):
        read_llama_file(bad)
    bad.write_bytes((0x67677371).to_bytes(4, "little") + (3).to_bytes(4, "little") + (1000).to_bytes(4, "little"))
    with pytest.raises(FormatError, match="1000 tokens do not fit"):
        read_llama_file(bad)


def test_one_sequence_of_a_multi_sequence_session(smollm2_path, tmp_path, capsys):
    """compress --seq N takes sequence N out of a session file of a two-sequence context."""
    import llama_cpp
    from test_llama_state import _ctx_blob, _multi_seq_context

    from nexus_gguf.llama_files import LlamaFile
    from nexus_gguf.llama_state import parse_state

    llm = open_llama(smollm2_path, n_ctx=64)
    ctx = _multi_seq_context(llm, unified=True)  # seq 0: 20 tokens, seq 1: 8 shared + 6 own
    try:
        whole, seq1 = _ctx_blob(ctx), _ctx_blob(ctx, 1)
    finally:
        llama_cpp.llama_free(ctx)
    toks = llm.tokenize(b"The keeper wrote everything down in a ledger that nobody else had ever read before. " * 2)
    session = tmp_path / "two.session"
    session.write_bytes(b"".join(LlamaFile("session", np.asarray(toks[:8] + toks[:6], np.int32), whole).to_buffers()))
    assert main(["compress", smollm2_path, str(session), "--seq", "1", "--preset", "lossless", "-o", str(tmp_path / "s1.nxkv")]) == 0
    back = tmp_path / "s1.bin"
    assert main(["decompress", smollm2_path, str(tmp_path / "s1.nxkv"), "--format", "slot", "-o", str(back)]) == 0
    got = read_llama_file(back)
    want = parse_state(seq1, "sequence")
    have = parse_state(got.blob, "sequence")
    assert len(have.caches[0].streams[0].cells) == 14 and np.array_equal(have.caches[0].streams[0].cells.pos,
                                                                          want.caches[0].streams[0].cells.pos)
    assert main(["compress", smollm2_path, str(session), "--seq", "0"]) == 1  # 14 tokens are not sequence 0's 20 cells
    assert "not sequence 0" in capsys.readouterr().err
