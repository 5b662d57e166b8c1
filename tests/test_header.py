"""The header: every size it states is checked before anything is allocated, against its own
model record and (test_api) against a loaded model. Files whose header lies, with valid CRCs,
built from the golden files; no llama.cpp needed."""

from __future__ import annotations

import copy
import os

import numpy as np

import pytest

import golden
from nexus_gguf import format as fmt
from nexus_gguf.errors import FormatError, ModelMismatchError
from nexus_gguf.header import Header, Limits
from nexus_gguf.stages import TensorInfo

GEMMA_HIGH = os.path.join(golden.version_dir(1), "files", "gemma3-high.nxkv")
SMOL_LOSSLESS = os.path.join(golden.version_dir(1), "files", "smollm2-f16-vtrans-lossless.nxkv")


def _rewritten(tmp_path, source: str, edit) -> str:
    """source with its header changed by edit(header) and the file re-packed (CRCs valid)."""
    f = fmt.NxkvFile.open(source)
    header = copy.deepcopy(f.header)
    edit(header)
    path = tmp_path / "edited.nxkv"
    fmt.write_atomic(path, fmt.pack(header, [(name, bytes(f.section(name))) for name in f.names()]))
    return str(path)


def _stream(h, cache=0):
    return next(s for s in h["state"]["caches"][cache]["streams"] if s)


@pytest.mark.parametrize("source", [GEMMA_HIGH, SMOL_LOSSLESS], ids=["lossy", "lossless"])
@pytest.mark.parametrize("what, edit, match", [
    ("more cells than the context", lambda h: _stream(h).update(n_cells=h["prompt"]["n_pos"] + 1), "cells"),
    ("a huge cell count", lambda h: _stream(h).update(n_cells=1 << 40), "cells"),
    ("cell records too large", lambda h: _stream(h).update(cell_bytes=1 << 40), "cells"),
    ("more layers than the model", lambda h: _stream(h).update(layers=_stream(h)["layers"] * 40), "layers"),
    ("K rows wider than the model's", lambda h: _stream(h)["layers"][0].update(k_shape=[_stream(h)["n_cells"], 1 << 30]),
     "larger than the model"),
    ("more K rows than cells", lambda h: _stream(h)["layers"][0].update(k_shape=[1 << 20, 8]), "larger than the model"),
    ("a negative shape", lambda h: _stream(h)["layers"][0].update(v_shape=[-1, 8]), "invalid shape"),
    ("a three-cache state", lambda h: h["state"]["caches"].extend(h["state"]["caches"] * 2), "one or two caches"),
    # each stream within the context, but all of them together n_ctx times over: a memory bomb
    ("streams that together exceed the context", lambda h: h["state"]["caches"][0].update(
        streams=h["state"]["caches"][0]["streams"] * 1000), "streams hold"),
    ("an unknown cache type", lambda h: _stream(h)["layers"][0].update(k_type="q9_9"), "q9_9"),
])
def test_sizes_beyond_the_models_are_refused(tmp_path, source, what, edit, match):
    path = _rewritten(tmp_path, source, edit)
    with pytest.raises(FormatError, match=match):
        golden.decode_file(path)


@pytest.mark.parametrize("what, edit, match", [
    ("no prompt", lambda h: h.pop("prompt"), "prompt"),
    ("a huge token count", lambda h: h["prompt"].update(n_tokens=1 << 40), "n_tokens"),
    ("a boolean token count", lambda h: h["prompt"].update(n_tokens=True), "n_tokens"),
    ("a logits row of another vocabulary", lambda h: h["logits"].update(n_vocab=h["logits"]["n_vocab"] + 1), "vocabulary"),
    ("an unknown logits type", lambda h: h["logits"].update(dtype="f8"), "logits"),
    ("an unknown stage", lambda h: h["pipeline"]["stages"].insert(0, {"id": "teleport"}), "teleport"),
    ("value heads of another size", lambda h: h["state"]["values"].update(head_dim_k=64), "heads"),
    ("a raw size that is not a number", lambda h: h["raw"].update(bytes="many"), "raw.bytes"),
    # found by tests/test_fuzz.py: each once escaped as TypeError, AttributeError or struct.error
    ("a stage id that is a list", lambda h: h["pipeline"]["stages"][0].update(id=[]), "no id"),
    ("a cache type that is not a name", lambda h: _stream(h)["layers"][0].update(v_type=None), "string"),
    ("a sequence state without its id", lambda h: h["state"].update(seq_id=None), "sequence id"),
    ("a state kind llama.cpp does not write", lambda h: h["state"].update(kind="stream"), "kind"),
    # found by the fuzz once decoders' own TypeErrors stopped passing as "layout malformed"
    ("a head size that is a float", lambda h: h["state"]["values"].update(head_dim_k=float(h["state"]["values"]["head_dim_k"])),
     "heads"),
    ("a rotation block that is a boolean", lambda h: h["state"]["values"].update(llama_rot_k=False), "heads"),
])
def test_malformed_headers_are_refused(tmp_path, what, edit, match):
    path = _rewritten(tmp_path, GEMMA_HIGH, edit)
    with pytest.raises(FormatError, match=match):
        golden.decode_file(path)


def test_limits_of_a_loaded_model_win(tmp_path):
    """Against a loaded model the model's own numbers bound the file, not the file's record."""
    h = Header(fmt.NxkvFile.open(GEMMA_HIGH).header)
    facts = type("Facts", (), {k: v for k, v in h.model.items()})
    limits = h.check_model(facts, n_ctx=16)
    assert limits == Limits(16, facts.n_layer, facts.n_head * facts.n_embd_head_k, facts.n_head * facts.n_embd_head_v,
                            facts.n_embd_head_k, facts.n_embd_head_v, facts.n_vocab)
    other = type("Facts", (), {**h.model, "fingerprint": "0" * 32, "file_name": "other.gguf"})
    with pytest.raises(ModelMismatchError, match="other.gguf"):
        h.check_model(other, 1024)
    small_vocab = type("Facts", (), {**h.model, "n_vocab": h.model["n_vocab"] - 1})
    with pytest.raises(FormatError, match="logits"):
        h.check_model(small_vocab, 1024)


def test_old_files_report_their_eviction():
    """Format 1 files of nexus-gguf 0.1 recorded eviction as a pipeline stage; the header reader
    gives it in the same place new files keep it."""
    h = Header(fmt.NxkvFile.open(os.path.join(golden.version_dir(1), "files", "gemma3-balanced.nxkv")).header)
    assert h.eviction["keep"] == 0.5 and h.eviction["kept"] > 0
    assert h.scoring == {"scorer": "attention", "window": 32, "used": "attention", "note": ""}
    assert [s.stage_id for s in h.pipeline.stages] == ["rope", "hadamard", "lattice", "entropy"]
    assert Header(fmt.NxkvFile.open(GEMMA_HIGH).header).eviction is None


def test_values_that_are_not_finite_are_refused(tmp_path):
    """A lattice `mean` of NaN bits behind valid CRCs: refused, not handed to llama.cpp."""
    from nexus_gguf.stages.entropy import Entropy

    f = fmt.NxkvFile.open(GEMMA_HIGH)
    name = next(n for n in f.names() if n.startswith("k."))
    info = TensorInfo(name, "f16", 2, 10**7)
    symbols = Entropy().decode(np.frombuffer(f.section(name), np.uint8), info)
    symbols["mean"] = np.full_like(symbols["mean"], 0x7E00)  # f16 NaN
    coded = bytes(Entropy().encode(symbols, info))
    path = tmp_path / "nan.nxkv"
    fmt.write_atomic(path, fmt.pack(f.header, [(n, coded if n == name else bytes(f.section(n))) for n in f.names()]))
    with pytest.raises(FormatError, match="not finite"):
        golden.decode_file(str(path))
