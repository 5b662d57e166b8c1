"""The nexus-gguf command line, run in-process through cli.main."""

from __future__ import annotations

import json

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
    assert "pipeline   high: rope -> hadamard -> lattice -> entropy" in capsys.readouterr().out


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
    with pytest.raises(SystemExit):
        main(["save-state", "m.gguf", "p.txt", "--preset", "nope"])
