"""Write the golden files of the current format version under tests/fixtures/v<N>/.

Run only by decision: the fixtures pin every encoded byte, so a fixture that has to change means
the format changed (bump FORMAT_VERSION, keep the old fixtures loading). Needs llama-cpp-python,
the gguf package and the default model (the complete files come from real llama.cpp states).

    python tools/make_fixtures.py            # a new format version's fixtures
    python tools/make_fixtures.py --add      # add new stage cases, and files of presets whose
                                             # encoding changed; existing fixtures never change
    python tools/make_fixtures.py --force    # rewrite the current version (a format change)
    python tools/make_fixtures.py --repin-decoded "WHY"
                                             # the decoder's float arithmetic changed on purpose
                                             # (not what stored bytes mean): re-pin the decoded
                                             # hashes of lossy files, and today's writer's
                                             # sections where they differ from a file's; the
                                             # files stay, the old hashes and WHY are kept
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import os
import shutil
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # this checkout, not an installed copy

import golden  # noqa: E402

from nexus_gguf.format import FORMAT_VERSION  # noqa: E402
from nexus_gguf.pipeline import PRESETS, META_STAGES  # noqa: E402
from nexus_gguf.stages import TensorInfo  # noqa: E402


def _preset_stage(preset: str, stage_id: str) -> dict:
    return next(dict(c) for c in PRESETS[preset]["stages"] if c["id"] == stage_id)


def _values(rng, n, h, d, offset=3.0) -> np.ndarray:
    """Cache-like values: a per-channel offset (what centring removes), heavy-ish tails."""
    x = rng.standard_normal((n, h, d)) * rng.exponential(1.0, (1, h, d)) + offset * rng.standard_normal((1, h, d))
    x[0] *= 8  # a sink-like first token
    return x.astype(np.float32)


def _info(kind, n, h, d, pos=None, layer=3, sliding=False, name=None):
    pos = np.arange(n, dtype=np.int32) if pos is None else np.asarray(pos, np.int32)
    return TensorInfo(name or f"{kind}.0.0.{layer}", "f16", 2, n * h * d * 4, kind=kind, positions=pos,
                      model_layer=layer, sliding=sliding, n_cells=n, n_heads=h, head_dim=d)


def stage_cases(rng):
    """(case, inputs, info) for every stage and every option set the presets use, plus the
    option sets a measured ablation needs."""
    out = []
    n, h, d = 40, 3, 64
    # bytes -> bytes: f16 / f32 / block-quantized sections, and the metadata coder
    for es in (1, 2, 4):
        raw = rng.integers(0, 256, 4096 * es, dtype=np.uint8)
        raw[1::2] &= 0x3F  # structure worth compressing
        info = TensorInfo(f"k.0.0.{es}", {1: "q8_0", 2: "f16", 4: "f32"}[es], {1: 0, 2: 2, 4: 4}[es], raw.size)
        out.append(({"case": f"lossless-es{es}", "stages": PRESETS["lossless"]["stages"]}, raw, info))
    meta = rng.integers(0, 50, 3000, dtype=np.int32).view(np.uint8)
    out.append(({"case": "meta-zstd", "stages": META_STAGES}, meta, TensorInfo("tokens", "raw", 0, meta.size)))
    # value stages
    x = _values(rng, n, h, d)
    pos = np.arange(1000, 1000 + n, dtype=np.int32)
    rope_norm = {"id": "rope", "mode": "norm", "n_rot": 64, "freq_base": 100000.0}
    rope_neox_swa = {"id": "rope", "mode": "neox", "n_rot": 64, "freq_base": 1e6, "freq_base_swa": 10000.0}
    rope_yarn_partial = {"id": "rope", "mode": "neox", "n_rot": 32, "freq_base": 10000.0, "freq_scale": 0.25,
                         "ext_factor": 1.0, "n_ctx_orig": 4096}
    out.append(({"case": "rope-norm", "stages": [rope_norm]}, x, _info("k", n, h, d, pos)))
    out.append(({"case": "rope-neox-sliding", "stages": [rope_neox_swa]}, x, _info("k", n, h, d, pos, sliding=True)))
    out.append(({"case": "rope-yarn-partial", "stages": [rope_yarn_partial]}, x, _info("k", n, h, d, pos)))
    out.append(({"case": "hadamard-64", "stages": [{"id": "hadamard"}]}, x, _info("v", n, h, d)))
    x80 = _values(rng, n, 2, 80)
    out.append(({"case": "hadamard-80", "stages": [{"id": "hadamard"}]}, x80, _info("k", n, 2, 80)))
    # the quantizer of every lossy preset, on K and V, from the same kind of values
    for preset in ("high", "balanced", "max", "seed"):
        lat = _preset_stage(preset, "lattice")
        for kind in ("k", "v"):
            info = _info(kind, n, h, d, pos=np.arange(n), layer=0 if kind == "k" else 29)
            out.append(({"case": f"lattice-{preset}-{kind}", "stages": [lat]}, x, info))
    # options no preset uses but a measured ablation or the README names
    lat_vec = {"id": "lattice", "k_bits": 3.0, "v_bits": 3.0, "scale_scope": "vector", "scale_block": 16}
    out.append(({"case": "lattice-vector-block16", "stages": [lat_vec]}, x, _info("k", n, h, d)))
    # importance-aware steps (lattice token_steps), with heavy-tailed importance as attention gives
    importance = rng.lognormal(0.0, 2.0, n)
    tok = {"id": "lattice", "k_bits": 3.5, "v_bits": 3.5, "scale_scope": "head", "token_steps": 0.5, "step_octaves": 3.0}
    out.append(({"case": "lattice-token-steps", "stages": [tok, {"id": "entropy"}]}, x,
                replace(_info("k", n, h, d), importance=importance)))
    # symbol stages and coders, from the lattice symbols of `high` and `seed`
    from nexus_gguf.stages import stage_from_config

    sym_high = stage_from_config(_preset_stage("high", "lattice")).encode(x, _info("k", n, h, d))
    sym_seed = stage_from_config(_preset_stage("seed", "lattice")).encode(x, _info("k", n, h, d))
    out.append(({"case": "entropy-rans", "stages": [_preset_stage("high", "entropy")]}, sym_high, _info("k", n, h, d)))
    out.append(({"case": "delta-seed", "stages": [_preset_stage("seed", "delta")]}, sym_seed, _info("k", n, h, d)))
    lanes = {"id": "entropy", "lanes": 8, "chunk": 1000}  # interleaved rANS: chunks, lanes, a short last chunk
    out.append(({"case": "entropy-rans-lanes", "stages": [lanes]}, sym_high, _info("k", n, h, d)))
    out.append(({"case": "entropy-zstd-seed", "stages": [_preset_stage("seed", "entropy")]}, sym_seed, _info("k", n, h, d)))
    # rANS with a wide alphabet (falls back to zstd) and an empty stream
    wide = {"coord": rng.integers(-9000, 9000, (20, 3)).astype(np.int32), "empty": np.zeros((0, 2), np.int16),
            "bits": rng.integers(0, 2, 33).astype(np.uint8)}
    out.append(({"case": "entropy-rans-mixed", "stages": [{"id": "entropy"}]}, wide, _info("k", n, h, d)))
    # each head on its own principal axes (basis stored), one entropy model per component class;
    # its own generator, so the cases above keep their inputs
    prng = np.random.default_rng(2026)
    xp = _values(prng, 160, 2, 32)
    pca = {"id": "lattice", "k_bits": 3.5, "v_bits": 3.5, "scale_scope": "head", "transform": "pca", "pca_min_cells": 64,
           "classes": True}
    out.append(({"case": "lattice-pca-classes", "stages": [pca, {"id": "entropy"}]}, xp, _info("k", 160, 2, 32)))
    # K weighted by the queries' energy per channel (pairs equal, as RoPE pairs make them)
    energy = np.repeat(prng.lognormal(0.0, 2.0, (2, 16)), 2, axis=1)
    weighted = {**pca, "k_weights": "queries"}
    out.append(({"case": "lattice-pca-k-weights", "stages": [weighted, {"id": "entropy"}]}, xp,
                replace(_info("k", 160, 2, 32), query_energy=energy)))
    # two heads coded as one vector (head_group): one step, one 64 x 64 basis, classes across both
    grouped = {**pca, "head_group": 0, "basis_bits": 8}
    out.append(({"case": "lattice-pca-head-group", "stages": [grouped, {"id": "entropy"}]}, xp, _info("k", 160, 2, 32)))
    # rate-distortion quantization (the writer's choice of points) with importance-aware steps:
    # a rate model per step bucket
    rdo = {**grouped, "token_steps": 0.5, "step_octaves": 3.0, "rdo": 0.05}
    out.append(({"case": "lattice-rdo-steps", "stages": [rdo, {"id": "entropy"}]}, xp,
                replace(_info("k", 160, 2, 32), importance=prng.lognormal(0.0, 2.0, 160))))
    # weak components left out (the writer's basis_prune): their basis rows, and those of
    # components whose points all came out zero, stored as zeros
    pruned = {**grouped, "rdo": 0.05, "basis_prune": 0.3}
    out.append(({"case": "lattice-basis-prune", "stages": [pruned, {"id": "entropy"}]}, xp, _info("k", 160, 2, 32)))
    return out


def e8_ties(rng) -> np.ndarray:
    """Inputs exactly halfway between lattice points, so the tie rule is pinned: multiples of
    1/4 (between the two cosets and between D8 neighbours), exactly representable."""
    fixed = np.array([
        [0.25] * 8, [-0.25] * 8, [0.5, 0, 0, 0, 0, 0, 0, 0], [-0.5, 0, 0, 0, 0, 0, 0, 0], [0.5] * 8,
        [0.5, 0.5, 0, 0, 0, 0, 0, 0], [1.5, 0.5, -0.5, 0, 0, 0, 0, 0], [0.75, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25],
        [1, 0, 0, 0, 0, 0, 0, 0], [0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0],
    ])
    random = rng.integers(-12, 13, (2000, 8)) / 4.0
    return np.concatenate([fixed, random])


def _preset_key(stages: list, eviction) -> str:
    """What makes two files of one prompt and preset encode differently."""
    stages = [c for c in stages if c.get("id") != "evict"]
    return json.dumps({"stages": stages, "keep": None if eviction is None else eviction.get("keep")}, sort_keys=True)


def write_files(vdir: str, existing: list[dict]) -> list[dict]:
    """Complete files of every preset from real llama.cpp states: for each prompt setup and
    preset, one file per distinct encoding (a preset whose stages or eviction changed since the
    existing files gets a new file, named with the package version; existing files stay)."""
    import llama_cpp

    import nexus_gguf as ng
    from nexus_gguf import llama_bridge as bridge
    from nexus_gguf.default_model import default_model_path
    from nexus_gguf.format import NxkvFile
    from nexus_gguf.header import Header
    from nexus_gguf.pipeline import build_pipeline
    from nexus_gguf.scoring import score_cells
    from nexus_gguf.stages import ModelBinding
    from tiny_models import write_tiny_gemma3

    files_dir = os.path.join(vdir, "files")
    os.makedirs(files_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="nxkv-fixtures-")
    gemma = write_tiny_gemma3(os.path.join(tmp, "tiny-gemma3.gguf"))
    # two KV heads, so that high's head group (both heads as one vector, one basis) is pinned too
    gemma_kv2 = write_tiny_gemma3(os.path.join(tmp, "tiny-gemma3-kv2.gguf"), n_head=4, n_head_kv=2)
    text = open(os.path.join(ROOT, "tests", "data", "prose.txt"), encoding="utf-8").read()
    have = {}
    for e in existing:
        h = Header(NxkvFile.open(os.path.join(vdir, e["file"])).header)
        # canonical configs: options a version retired drop out, defaults fill in
        have.setdefault((e["source"], e["preset"]), set()).add(_preset_key(h.pipeline.get_config()["stages"], h.eviction))

    def llama(path, n_ctx=256, **kw):
        return llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=2, n_batch=256, verbose=False, **kw)

    setups = [
        # (prefix, model, Llama kwargs, tokens)
        ("gemma3", gemma, {"swa_full": False}, lambda m: m.tokenize(text[:400].encode(), add_bos=False)[:48]),
        ("smollm2-f16-vtrans", default_model_path(), {"flash_attn": False}, lambda m: m.tokenize(text.encode(), add_bos=True)[:16]),
        ("smollm2-q8_0", default_model_path(), {"flash_attn": True, "type_k": 8, "type_v": 8},
         lambda m: m.tokenize(text.encode(), add_bos=True)[:16]),
        # enough cells for the PCA transform (high's pca_min_cells) in the full-attention layer
        ("gemma3-long", gemma_kv2, {"swa_full": False, "n_ctx": 2048}, lambda m: m.tokenize(text.encode(), add_bos=False)[:1700]),
    ]
    presets = {"gemma3": list(PRESETS), "smollm2-f16-vtrans": ["lossless", "high"], "smollm2-q8_0": ["lossless", "high"],
               "gemma3-long": ["lossless", "high"]}
    entries = []
    for prefix, model, kw, toks in setups:
        llm = llama(model, **kw)
        tokens = toks(llm)
        llm.eval(tokens)
        source = f"files/{prefix}-lossless.nxkv"
        for preset in presets[prefix]:
            pipeline = build_pipeline(preset).bind(ModelBinding(bridge.model_facts(llm), bridge.context_facts(llm, rope=True)))
            key = _preset_key(pipeline.get_config()["stages"], None if pipeline.eviction is None else pipeline.eviction.get_config())
            if key in have.get((source, preset), set()):
                continue
            stem = f"{prefix}-{preset}" if not existing else f"{prefix}-{preset}-{ng.__version__}"
            taken = stem
            for k in range(2, 1000):  # one version may change a preset's encoding twice: never overwrite
                if not os.path.exists(os.path.join(files_dir, f"{stem}.nxkv")):
                    break
                stem = f"{taken}-{k}"
            name = f"{stem}.nxkv"
            path = os.path.join(files_dir, name)
            # no bit profile: a file pins the format's coding, not the profile data shipped today
            # (the writer test re-encodes with the stages alone)
            ng.save_state(llm, path, preset, bit_profile=None)
            entry = {"file": f"files/{name}", "preset": preset, "source": source}
            weighted = pipeline.queries_used_at(len(tokens))  # as save_state decides
            steps = pipeline.importance_used_at(len(tokens))
            if steps or weighted:
                # the scores the writer used, so the test can re-encode without llama.cpp
                blob = bridge.get_seq_state(llm, 0)
                state = golden.parse_state(blob, "sequence", bridge.model_facts(llm).state_layout())
                scores = score_cells(llm, blob, state, tokens, pipeline.scoring.window, pipeline.scoring.scorer,
                                     importance=steps, energy=weighted,
                                     context=pipeline.scoring.context, exact_importance=pipeline.eviction is not None)
                if steps:
                    entry["importance"] = f"files/{stem}.importance.npy"
                    np.save(os.path.join(vdir, entry["importance"]), scores.importance)
                if weighted and scores.query_energy is not None:
                    entry["queries"] = f"files/{stem}.queries.npz"
                    np.savez_compressed(os.path.join(vdir, entry["queries"]),
                                        **{str(k): v for k, v in scores.query_energy.items()})
            d = golden.decode_file(path)
            entry.update({
                "blob_sha256": golden.sha256(d["blob"]),
                "tokens_sha256": golden.sha256(d["tokens"]),
                "logits_sha256": None if d["logits"] is None else golden.sha256(d["logits"]),
            })
            entries.append(entry)
    shutil.rmtree(tmp, ignore_errors=True)
    return entries


def repin_decoded(why: str) -> int:
    """Re-pin what today's decoder and writer make of the committed files, keeping the files."""
    import datetime
    import hashlib

    changed = 0
    for version in sorted(int(d[1:]) for d in os.listdir(golden.FIXTURES) if d.startswith("v") and d[1:].isdigit()):
        vdir = golden.version_dir(version)
        manifest = golden.load_manifest(version)
        for e in manifest["files"]:
            path = os.path.join(vdir, e["file"])
            d = golden.decode_file(path)
            now = {"blob_sha256": golden.sha256(d["blob"]), "tokens_sha256": golden.sha256(d["tokens"]),
                   "logits_sha256": None if d["logits"] is None else golden.sha256(d["logits"])}
            old = {k: e[k] for k in now if e[k] != now[k]}
            if version == FORMAT_VERSION:
                raw = golden.decode_file(os.path.join(vdir, e["source"]))["blob"]
                importance, queries = golden.load_scores(vdir, e)
                made = golden.reencode_file(path, raw, importance, queries)
                f = d["file"]
                same = list(made) == f.names() and all(made[n] == bytes(f.section(n)) for n in f.names())
                pinned = None if same else {n: hashlib.sha256(b).hexdigest() for n, b in made.items()}
                if pinned != e.get("writer_sha256"):
                    old["writer_sha256"] = e.get("writer_sha256")
                    if pinned is None:
                        e.pop("writer_sha256", None)
                    else:
                        e["writer_sha256"] = pinned
            if old:
                e.update(now)
                e.setdefault("repinned", []).append({"date": datetime.date.today().isoformat(), "why": why, "old": old})
                changed += 1
                print(f"v{version}/{e['file']}: re-pinned {', '.join(sorted(old))}")
        with open(os.path.join(vdir, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
    print(f"{changed} file entries re-pinned")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rewrite the fixtures of the current version (a format change)")
    ap.add_argument("--add", action="store_true",
                    help="add only what the manifest lacks: new stage cases, files of presets whose encoding changed")
    ap.add_argument("--repin-decoded", metavar="WHY",
                    help="the decoder's float arithmetic changed on purpose: re-pin decoded hashes, keep the files")
    ap.add_argument("--seed", type=int, default=20261129)
    args = ap.parse_args()
    if args.repin_decoded:
        return repin_decoded(args.repin_decoded)
    vdir = golden.version_dir(FORMAT_VERSION)
    manifest_path = os.path.join(vdir, "manifest.json")
    exists = os.path.exists(manifest_path)
    if exists and not (args.force or args.add):
        print(f"{vdir} exists: fixtures pin released bytes; --add adds new cases, --force is for a format change",
              file=sys.stderr)
        return 1
    if args.force or not exists:
        shutil.rmtree(vdir, ignore_errors=True)
        os.makedirs(vdir)
        manifest = {"format_version": FORMAT_VERSION, "stages": [], "e8_ties": "e8_ties.npz", "files": []}
    else:
        manifest = golden.load_manifest(FORMAT_VERSION)
    rng = np.random.default_rng(args.seed)
    known = {e["case"] for e in manifest["stages"]}
    new_stages = [golden.write_stage_case(FORMAT_VERSION, case, inputs, info) for case, inputs, info in stage_cases(rng)
                  if case["case"] not in known]
    from nexus_gguf.backends import reference

    if not os.path.exists(os.path.join(vdir, manifest["e8_ties"])):
        ties = e8_ties(rng)
        np.savez_compressed(os.path.join(vdir, manifest["e8_ties"]), input=ties, nearest=reference.e8_nearest(ties))
    new_files = write_files(vdir, manifest["files"])
    manifest["stages"] += new_stages
    manifest["files"] += new_files
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"wrote {len(new_stages)} stage cases and {len(new_files)} files to {vdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
