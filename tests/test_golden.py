"""Golden files: every committed stage case and complete .nxkv file of every format version
decodes to the same bytes, and today's encoders still write the same bytes (golden.py, and
tools/make_fixtures.py that wrote them). No llama.cpp needed."""

from __future__ import annotations

import os

import numpy as np
import pytest

import golden
from nexus_gguf.backends import BACKENDS, backend_status, implementation
from nexus_gguf.format import FORMAT_VERSION, NxkvFile, crc32

VERSIONS = sorted(int(d[1:]) for d in os.listdir(golden.FIXTURES) if d.startswith("v") and d[1:].isdigit())
STAGE_CASES = [(v, e) for v in VERSIONS for e in golden.load_manifest(v)["stages"]]
FILE_CASES = [(v, e) for v in VERSIONS for e in golden.load_manifest(v)["files"]]


def test_every_format_version_has_fixtures():
    assert VERSIONS == list(range(1, FORMAT_VERSION + 1))


def _float_output(entry) -> bool:
    # value stages (rope, hadamard) map floats to floats that no file stores
    return all(c["id"] in ("rope", "hadamard") for c in entry["stages"])


def stage_case_errors(version, entry) -> list[str]:
    inputs, encoded, decoded, info = golden.load_stage_case(version, entry)
    exact = not _float_output(entry)
    out = []
    why = golden.same(golden.run_stages(entry["stages"], inputs, info, "encode"), encoded, exact)
    if why:
        out.append(f"encode: {why}")
    why = golden.same(golden.run_stages(entry["stages"], encoded, info, "decode"), decoded, exact)
    if why:
        out.append(f"decode: {why}")
    return out


@pytest.mark.parametrize("version,entry", STAGE_CASES, ids=[f"v{v}-{e['case']}" for v, e in STAGE_CASES])
def test_stage_case(version, entry):
    errors = stage_case_errors(version, entry)
    assert not errors, f"fixture v{version}/{entry['data']}: " + "; ".join(errors)


@pytest.mark.parametrize("version,entry", FILE_CASES, ids=[f"v{v}-{os.path.basename(e['file'])}" for v, e in FILE_CASES])
def test_file_decodes_to_the_same_bytes(version, entry):
    d = golden.decode_file(os.path.join(golden.version_dir(version), entry["file"]))
    assert golden.sha256(d["blob"]) == entry["blob_sha256"], f"{entry['file']}: the rebuilt llama.cpp state changed"
    assert golden.sha256(d["tokens"]) == entry["tokens_sha256"], f"{entry['file']}: the prompt tokens changed"
    if entry["logits_sha256"] is None:
        assert d["logits"] is None
    else:
        assert golden.sha256(d["logits"]) == entry["logits_sha256"], f"{entry['file']}: the logits row changed"


@pytest.mark.parametrize("version,entry", [c for c in FILE_CASES if c[0] == FORMAT_VERSION],
                         ids=[os.path.basename(e["file"]) for v, e in FILE_CASES if v == FORMAT_VERSION])
def test_writer_makes_the_same_sections(version, entry):
    vdir = golden.version_dir(version)
    raw = golden.decode_file(os.path.join(vdir, entry["source"]))["blob"]
    path = os.path.join(vdir, entry["file"])
    f = NxkvFile.open(path)
    importance, queries = golden.load_scores(vdir, entry)
    made = golden.reencode_file(path, raw, importance, queries)
    if "writer_sha256" in entry:
        # the writer's float arithmetic changed on purpose since this file was written
        # (manifest "repinned"): today's sections are pinned by hash, the file still loads
        assert list(made) == list(entry["writer_sha256"]), f"{entry['file']}: section list changed"
        for name, digest in entry["writer_sha256"].items():
            assert golden.sha256(made[name]) == digest, f"{entry['file']}: section {name!r} is encoded differently"
        return
    assert list(made) == f.names(), f"{entry['file']}: section list changed"
    for name in f.names():
        assert made[name] == bytes(f.section(name)), f"{entry['file']}: section {name!r} is encoded differently"


def test_lossless_files_rebuild_the_saved_state():
    for version, entry in FILE_CASES:
        if entry["preset"] == "lossless":
            d = golden.decode_file(os.path.join(golden.version_dir(version), entry["file"]))
            h = d["header"]
            assert len(d["blob"]) == h.raw_bytes and crc32(d["blob"]) == h.raw_crc32


@pytest.mark.parametrize("name", BACKENDS)
def test_e8_ties_break_as_pinned(name):
    status = backend_status()[name]
    if status != "available":
        pytest.skip(status)
    impl = implementation("e8_nearest", name)
    if impl is None:
        pytest.skip(f"the {name} backend has no E8 kernel (yet)")
    for version in VERSIONS:
        npz = np.load(os.path.join(golden.version_dir(version), golden.load_manifest(version)["e8_ties"]))
        np.testing.assert_array_equal(impl(npz["input"]), npz["nearest"])


def test_a_changed_encoder_byte_fails_a_named_case(monkeypatch):
    """The fixtures are only worth having if they notice: make rANS emit one different byte and
    round E8 ties the other way, and the cases that use them must fail."""
    from nexus_gguf.backends import reference
    from nexus_gguf.stages import entropy

    real_rans = entropy.kernel

    def kernel(op):
        impl = real_rans(op)
        if op != "rans_encode":
            return impl
        return lambda symbols, freqs: bytes([impl(symbols, freqs)[0] ^ 1]) + impl(symbols, freqs)[1:]

    monkeypatch.setattr(entropy, "kernel", kernel)
    failing = {e["case"] for v, e in STAGE_CASES if stage_case_errors(v, e)}
    assert "entropy-rans" in failing and "lossless-es2" not in failing
    monkeypatch.setattr(entropy, "kernel", real_rans)

    def e8_other_ties(x):  # prefer the half-integer coset on ties
        x = np.asarray(x, np.float64).reshape(-1, 8)
        a = reference._d8_nearest(x)
        b = reference._d8_nearest(x - 0.5) + 0.5
        return np.where((((x - b) ** 2).sum(1) <= ((x - a) ** 2).sum(1))[:, None], b, a)

    ties = np.load(os.path.join(golden.version_dir(VERSIONS[-1]), "e8_ties.npz"))
    assert not np.array_equal(e8_other_ties(ties["input"]), ties["nearest"])


def test_the_current_high_file_pins_the_pca_transform_and_classes():
    """The golden files of `high` must exercise what `high` does: a state with enough cells for
    the PCA basis and the class split (gemma3-long: 1700 tokens in its full-attention layer, two
    KV heads coded as one vector) and, since high takes importance-aware steps, several step
    buckets split by class, so that the pinned hashes cover core/transform.h, the head group,
    the per-class symbol columns and the per-bucket tables."""
    from nexus_gguf.header import Header
    from nexus_gguf.stages import TensorInfo

    entries = [e for v, e in FILE_CASES if v == FORMAT_VERSION and e["preset"] == "high" and "long" in e["file"]]
    assert entries, "no long `high` file in the current version's fixtures"
    path = os.path.join(golden.version_dir(FORMAT_VERSION), entries[-1]["file"])
    f = NxkvFile.open(path)
    h = Header(f.header, path)
    entropy = h.pipeline.stages[-1]
    names, bases = set(), set()
    for section in f.names():
        if section.startswith(("k.", "v.")):
            data = np.frombuffer(bytes(f.section(section)), np.uint8)
            streams = entropy.streams(data, TensorInfo(section, "f16", 2, 1 << 30))
            names |= {s.name for s in streams}
            bases |= {tuple(s.shape) for s in streams if s.name == "basis"}
    assert "basis" in names and "class" in names
    if any(s.get("token_steps") for s in h.pipeline.get_config()["stages"]):
        buckets = {n.split(".")[1] for n in names if n.startswith("coset.") and n.count(".") == 2}
        assert "bucket" in names and len(buckets) > 2 and not any(n.startswith("coset.c") for n in names)
    else:
        assert any(n.startswith("coset.c") for n in names)
    assert (1, 64, 64) in bases  # both heads of 32 values on one basis
