"""The nexus-gguf command line, run in-process through cli.main."""

from __future__ import annotations

import json
import os

import pytest

from nexus_gguf.cli import main


@pytest.fixture(scope="module")
def short_prompt(tmp_path_factory, prompt_text):
    p = tmp_path_factory.mktemp("cli") / "prompt.txt"
    p.write_text(prompt_text[:300], encoding="utf-8")
    return p


def test_save_state_then_info(smollm2_path, short_prompt, capsys):
    assert main(["save-state", smollm2_path, str(short_prompt), "--threads", "2"]) == 0
    out_file = short_prompt.with_suffix(".nxkv")
    assert out_file.exists()
    line = capsys.readouterr().out.strip()
    assert "tokens" in line and "high" in line and "x," in line  # the default preset
    assert main(["info", str(out_file), "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] and info["model"]["file_name"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert main(["info", str(out_file)]) == 0
    assert ("pipeline   high: rope -> lattice (K 3.5 / V 3.5 bits, heads grouped, pca, classes, K weighted by the queries "
            "(+0.2 bits), steps by importance (^-0.5, up to 3.0 octaves coarser), points by rate and distortion (0.05 per bit), "
                "components below 0.1 steps² left out)"
            " -> entropy") in capsys.readouterr().out


def test_generate_with_appended_prompt(smollm2_path, short_prompt, tmp_path, capsys):
    """A lossless state plus appended text continues exactly as reading both directly does."""
    from conftest import open_llama

    out_file = tmp_path / "lossless.nxkv"
    assert main(["save-state", smollm2_path, str(short_prompt), "-o", str(out_file), "--preset", "lossless",
                 "--threads", "2"]) == 0
    capsys.readouterr()
    assert main(["generate", smollm2_path, str(out_file), "--prompt", " The keeper", "-n", "12", "--threads", "2"]) == 0
    captured = capsys.readouterr()
    assert "restored" in captured.err
    direct = open_llama(smollm2_path)
    prompt = direct.tokenize(short_prompt.read_text(encoding="utf-8").encode(), add_bos=True, special=True)
    prompt += direct.tokenize(b" The keeper", add_bos=False, special=True)
    want = direct.create_completion(prompt=prompt, max_tokens=12, temperature=0)["choices"][0]["text"]
    assert len(want) > 0 and captured.out == want + "\n"


def test_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.nxkv"
    bad.write_bytes(b"not a state file at all, just text")
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nexus-gguf: error:") and "magic" in err[0]
    assert main(["save-state", str(tmp_path / "missing.gguf"), str(bad)]) == 1
    assert "no such model file" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "none.nxkv")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["save-state", "m.gguf", "p.txt", "--preset", "nope"])


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nexus-gguf: error: "), captured.err
    assert "Traceback" not in captured.err and not captured.out
    return lines[0]


@pytest.mark.parametrize("content, match", [
    (b"", "is empty: there is no prompt to save"),
    (b"  \n\t\n", "is empty"),
    (b"GGUF\x03\x00\x00\x00\x00\x00", "binary file"),
    ("Caf\u00e9 cr\u00e8me".encode("latin-1"), r"is not utf-8 text \(byte 0xe9 at offset 3\).* --encoding latin-1"),
])
def test_bad_prompt_files_are_one_clear_line(tmp_path, capsys, content, match):
    """Checked before any model is loaded: no llama.cpp needed, no prefill wasted."""
    import re

    prompt = tmp_path / "p.txt"
    prompt.write_bytes(content)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)  # never opened: the prompt fails first
    assert main(["save-state", str(model), str(prompt)]) == 1
    assert re.search(match, _one_error_line(capsys))
    assert not prompt.with_suffix(".nxkv").exists()


def test_bad_paths_are_one_clear_line(tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello there, this is a prompt of some length", encoding="utf-8")
    assert main(["save-state", str(tmp_path / "m.gguf"), str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt: no such prompt file" in _one_error_line(capsys)
    assert main(["save-state", str(tmp_path / "m.gguf"), str(prompt), "-o", str(tmp_path / "no" / "x.nxkv")]) == 1
    assert f"the directory {tmp_path / 'no'} does not exist" in _one_error_line(capsys)
    assert main(["save-state", str(prompt), str(prompt)]) == 1  # a text file given as the model
    assert "p.txt: not a GGUF file (bad magic)" in _one_error_line(capsys)
    assert main(["save-state", str(tmp_path / "none.gguf"), str(prompt)]) == 1
    assert "none.gguf: no such model file" in _one_error_line(capsys)
    assert main(["save-state", str(tmp_path), str(prompt)]) == 1  # a directory given as the model
    assert f"{tmp_path} is a directory, not a model file" in _one_error_line(capsys)
    assert main(["save-state", str(prompt), str(tmp_path)]) == 1  # and as the prompt
    assert f"{tmp_path}: cannot read the prompt (Is a directory)" in _one_error_line(capsys)
    assert main(["save-state", str(prompt), str(prompt), "--encoding", "klingon"]) == 1
    assert "no such text encoding" in _one_error_line(capsys)
    assert main(["save-state", str(tmp_path / "m.gguf"), str(prompt), "--set", "lattice.k_bits=99"]) == 1
    assert "bits must lie in 0.5 .. 12" in _one_error_line(capsys)  # before any model is loaded


def test_llama_cpp_logs_do_not_reach_the_output(smollm2_path, short_prompt, tmp_path):
    """What a user sees at the terminal (both streams of a real process, where llama.cpp's own C
    logging would land): save-state's one report line and nothing on stderr; generate's text on
    stdout and its one restore line on stderr."""
    import subprocess
    import sys

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "nexus_gguf.cli", *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        for line in (r.stdout + r.stderr).replace(str(tmp_path), "<tmp>").splitlines():
            assert not any(m in line for m in ("llama_", "ggml_", "load_tensors", "print_info", "n_ctx_seq")), line
        return r

    out = tmp_path / "p.nxkv"
    r = run("save-state", smollm2_path, str(short_prompt), "-o", str(out), "--threads", "2")
    assert r.stderr == "" and len(r.stdout.splitlines()) == 1 and f"{out}: " in r.stdout
    r = run("generate", smollm2_path, str(out), "-n", "4", "--threads", "2")
    assert r.stdout.strip() and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("restored ")


def test_an_unreadable_model_is_one_clear_line(smollm2_path, tmp_path, capsys, monkeypatch):
    """A model file the process may not open (EACCES; the tests may run as root, whom file modes
    do not stop, so the open is made to fail) is one line naming it, before llama.cpp sees it."""
    import builtins

    from nexus_gguf import gguf_file

    prompt = tmp_path / "p.txt"
    prompt.write_text("hello there", encoding="utf-8")
    real_open = builtins.open

    def no_access(path, *a, **kw):
        if os.fspath(path) == smollm2_path:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(gguf_file, "open", no_access, raising=False)
    monkeypatch.setattr(gguf_file, "_cache", {})
    assert main(["save-state", smollm2_path, str(prompt)]) == 1
    assert f"{smollm2_path}: cannot read the model (Permission denied)" in _one_error_line(capsys)


def test_context_limits_are_one_clear_line(smollm2_path, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("word " * 9000, encoding="utf-8")
    assert main(["save-state", smollm2_path, str(prompt)]) == 1
    line = _one_error_line(capsys)
    assert "more than the 8192 the model was trained on" in line and "--n-ctx 9002" in line
    prompt.write_text("hello there", encoding="utf-8")
    assert main(["save-state", smollm2_path, str(prompt), "--n-ctx", "2"]) == 1
    assert "--n-ctx 2 is too small" in _one_error_line(capsys)


def test_a_latin1_prompt_with_its_encoding_is_read_as_text(smollm2_path, tmp_path, capsys):
    import llama_cpp

    prompt = tmp_path / "p.txt"
    prompt.write_bytes("Caf\u00e9 cr\u00e8me".encode("latin-1"))
    assert main(["save-state", smollm2_path, str(prompt), "--encoding", "latin-1", "--preset", "lossless"]) == 0
    assert capsys.readouterr().err == ""  # nothing from llama.cpp either
    from nexus_gguf import read_info
    from nexus_gguf.format import NxkvFile
    from nexus_gguf.state_file import decode_tokens
    from nexus_gguf.header import Header

    f = NxkvFile.open(prompt.with_suffix(".nxkv"))
    h = Header(f.header)
    tokens = decode_tokens(f.section("tokens"), h.n_tokens, h.limits())
    vocab = llama_cpp.Llama(smollm2_path, vocab_only=True, verbose=False)
    assert vocab.detokenize(list(tokens)).decode("utf-8").endswith("Caf\u00e9 cr\u00e8me")
    assert read_info(prompt.with_suffix(".nxkv"))["prompt"]["n_tokens"] == len(tokens)


def test_demo_compares_presets_side_by_side(smollm2_path, tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path), "--presets", "lossless,high", "-n", "8", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "demo-lossless.nxkv" in out and "demo-high.nxkv" in out and "x faster" in out
    assert "after restoring demo-lossless.nxkv: the same text" in out  # lossless restores exactly
    assert (tmp_path / "demo-high.nxkv").stat().st_size < (tmp_path / "demo-lossless.nxkv").stat().st_size / 3
    assert main(["demo", "--presets", "nope"]) == 1
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_a_full_disk_is_one_clear_line_and_keeps_the_old_file(smollm2_path, short_prompt, tmp_path):
    """save-state in a process the kernel stops writing past 64 KiB (a full disk, as the writer
    sees it): exit 1, one line naming the output, the previous output byte for byte, no leftovers."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    out = tmp_path / "prompt.nxkv"
    out.write_bytes(b"an earlier state")

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    r = subprocess.run([sys.executable, "-m", "nexus_gguf.cli", "save-state", smollm2_path, str(short_prompt),
                        "-o", str(out), "--preset", "lossless"], preexec_fn=limit_file_size, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot write {out}: File too large" in lines[0] and "nothing was replaced" in lines[0], r.stderr
    assert out.read_bytes() == b"an earlier state"
    assert [p.name for p in tmp_path.iterdir()] == ["prompt.nxkv"]
