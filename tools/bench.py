#!/usr/bin/env python3
"""The project's benchmark: every preset, the ablations of `high` and `seed`, and every baseline on SmolLM2-135M,
prose and source code, prefixes of 1024, 4096 and 7680 tokens, in one run on one machine.

    python tools/bench.py            # the full matrix (about an hour on 2 cores): writes
                                     # bench/results.json, bench/pareto.png and README's table
    python tools/bench.py --quick    # 1024-token prose prefix only (a few minutes): writes
                                     # bench/quick.json and bench/quick.png, README untouched
    python tools/bench.py --speed    # save / restore speed and memory against llama.cpp's own
                                     # state calls and the prefill, 4096 and 7680 tokens (a few
                                     # minutes): bench/speed.json and README's speed table

Figures are ratios against the raw state measured in the same run; times are single runs on a
shared machine, so compare them within a run, not across runs."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from typing import Optional
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure this checkout (native library built in place), not an installed copy
TEXTS = {"prose": ROOT / "tests/data/prose_long.txt", "code": ROOT / "tests/data/code.txt"}
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"
BOUNDED_SAVE_MEMORY = "0.25"  # NEXUS_GGUF_SAVE_MEMORY of the speed table's bounded saves (the target: +25%)
SPEED_BEGIN, SPEED_END = "<!-- speed:begin -->", "<!-- speed:end -->"
GEMMA_BEGIN, GEMMA_END = "<!-- gemma:begin -->", "<!-- gemma:end -->"

FULL = dict(texts=["prose", "code"], prefixes=[1024, 4096, 7680], eval_tokens=256, recall_trials=8,
            recall={"prose": [4096]}, ablate=["high", "seed"], eviction_at=[4096])
QUICK = dict(texts=["prose"], prefixes=[1024], eval_tokens=128, recall_trials=2, recall={"prose": [1024]},
             ablate=["high"], eviction_at=[1024])


def eviction_variants():
    """`high`'s lattice after evicting 25 / 50 / 75 % of the tokens, chosen by the real
    attention of the last 32 prompt tokens or by the key-key proxy; and `max` judged by the
    query-agnostic reconstruction scorer instead of the last window (`max/reconstruct`), also
    with 40% kept at 1.7 bits (`max-keep40-b1.7/reconstruct`, about `max`'s size)."""
    from nexus_gguf.eviction import Eviction, Scoring
    from nexus_gguf.pipeline import Pipeline, build_pipeline

    out = []
    for evicted in (25, 50, 75):
        for scorer in ("attention", "key-proxy"):
            eviction = Eviction(keep=1 - evicted / 100)
            out.append(Pipeline(build_pipeline("high").stages, f"high+evict{evicted}/{scorer}", eviction, Scoring(scorer=scorer)))
    for name, extra in (("max/reconstruct", {}),
                        ("max-keep40-b1.7/reconstruct", dict(evict_keep=0.4, lattice_k_bits=1.7, lattice_v_bits=1.7))):
        p = build_pipeline("max", score_scorer="reconstruct", **extra)
        out.append(Pipeline(p.stages, name, p.eviction, p.scoring))
    return out


def transform_variants():
    """`high` as format 1 coded it (Hadamard, one rANS table per stream: `high-hadamard`), as
    format 2 first coded it (each head alone, the basis at 6 bits, K/V 3.5 bits:
    `high-per-head-b6`), with each head alone but the 8-bit basis (`high-per-head`), without K
    weighted by the queries (`high-no-kweights`: the previous `high`), without its PCA transform
    (and so without K weights) or its component classes (one at a time), and 0.3 bits coarser:
    what each part of `high` buys (the ablations add `high-no-steps`, one step for every cell,
    `high-no-rdo`, every group at its nearest point, and `high-no-prune`, every basis row stored),
    and where the next bits are (README)."""
    from nexus_gguf.pipeline import Pipeline, build_pipeline
    from nexus_gguf.stages import stage_from_config

    high = build_pipeline("high")
    rope, lattice, entropy = high.stages
    hadamard_lattice = stage_from_config({**lattice.get_config(), "transform": "none", "classes": False, "head_group": 1,
                                          "k_bits": 3.5, "v_bits": 3.5, "k_weights": "none", "token_steps": 0.0, "rdo": 0.0})
    out = [Pipeline([rope, stage_from_config({"id": "hadamard"}), hadamard_lattice, entropy], "high-hadamard")]
    plain = dict(lattice_k_weights="none")
    k, v = round(lattice.k_bits - 0.3, 2), round(lattice.v_bits - 0.3, 2)
    for name, extra in (("high-per-head-b6", dict(lattice_head_group=1, lattice_basis_bits=6, lattice_pca_min_cells=1024,
                                                  lattice_k_bits=3.5, lattice_v_bits=3.5, lattice_k_weights="none",
                                                  lattice_token_steps=0.0, lattice_rdo=0.0, lattice_basis_prune=0.0)),
                        ("high-per-head", dict(lattice_head_group=1, lattice_pca_min_cells=1024, **plain)),
                        ("high-no-kweights", plain),
                        ("high-no-pca", dict(lattice_transform="none", **plain)), ("high-no-classes", dict(lattice_classes=False)),
                        ("high-coarser", dict(lattice_k_bits=k, lattice_v_bits=v))):
        p = build_pipeline("high", **extra)
        out.append(Pipeline(p.stages, name, p.eviction, p.scoring))
    return out


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}{_simd()}, {os.cpu_count()} threads, {platform.system()}"


def _simd() -> str:
    """The widest vector extensions the native library's kernels use on this CPU (figures differ
    by about 2x between them: README)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return ""
    if {"avx512f", "avx512vl", "avx512_vnni"} <= set(flags):
        return " (AVX-512 VNNI)"
    return " (AVX2)" if "avx2" in flags else " (no AVX2)"


def update_readme(readme: Path, block: str, begin: str = README_BEGIN, end: str = README_END) -> None:
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {begin} ... {end} markers")
    readme.write_text(pattern.sub(lambda _: f"{begin}\n{block}\n{end}", text), encoding="utf-8")


class PeakRss:
    """The most resident memory above the level at entry while the block runs (Linux: sampled
    from /proc/self/statm every millisecond by a thread), in bytes. Memory freed before the
    block is given back first (glibc keeps it resident for reuse: a block that reused it would
    look as if it needed none; measured: a second save in a process showed +29% of the state
    where it used +101%)."""

    def __enter__(self):
        import gc
        import threading

        from nexus_gguf.heap import release_freed_memory

        gc.collect()
        release_freed_memory()
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.extra = self.peak - self.base


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


_FRESH_PEAK = """
import json, sys
sys.path.insert(0, sys.argv[2])
from bench import PeakRss
import llama_cpp
import nexus_gguf as ng
a = json.loads(sys.argv[1])
llm = llama_cpp.Llama(a["model"], n_ctx=a["n_ctx"], n_threads=a["threads"], n_batch=512, verbose=False)
if a["op"] == "save":
    ng.load_state(llm, a["state"])  # the prompt's state, as if just evaluated
with PeakRss() as m:
    if a["op"] == "save":
        ng.save_state(llm, a["out"], a["preset"])
    else:
        ng.load_state(llm, a["path"])
print(m.extra)
"""


def fresh_process_peak(model: str, n_ctx: int, threads: int, op: str, env: Optional[dict] = None, **paths: str) -> int:
    """The resident memory one save_state (op "save": of the state in paths["state"], a lossless
    file, restored first, with paths["preset"] into paths["out"]) or one load_state (op "load":
    of paths["path"]) adds at its peak, as the first of its kind in a new process (what
    `nexus-gguf save-state` or `generate` adds), with `env` added to its environment: bytes."""
    import subprocess

    args = json.dumps({"model": model, "n_ctx": n_ctx, "threads": threads, "op": op, **paths})
    done = subprocess.run([sys.executable, "-c", _FRESH_PEAK, args, str(Path(__file__).resolve().parent)],
                          capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"the {op} memory measurement failed: {done.stderr[-2000:]}")
    return int(done.stdout.split()[-1])


_FRESH_LOAD = """
import json, sys, time
a = json.loads(sys.argv[1])
sys.path.insert(0, a["root"])  # this checkout, as the bench measures
import llama_cpp
import nexus_gguf as ng
llm = llama_cpp.Llama(a["model"], n_ctx=a["n_ctx"], n_threads=a["threads"], n_batch=512, verbose=False)
t = time.perf_counter()
ng.load_state(llm, a["path"])
print(time.perf_counter() - t)
"""


def fresh_process_load_seconds(model: str, n_ctx: int, threads: int, path: str, repeat: int) -> float:
    """The median time of a new process's first load_state of `path` (what `nexus-gguf generate`
    or a server's first restore waits for: the model's GGUF header read, the native library's
    declarations loaded, the state buffer's first pages), over `repeat` processes."""
    import subprocess

    args = json.dumps({"model": model, "n_ctx": n_ctx, "threads": threads, "path": path, "root": str(ROOT)})
    times = []
    for _ in range(repeat):
        done = subprocess.run([sys.executable, "-c", _FRESH_LOAD, args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the first-load measurement failed: {done.stderr[-2000:]}")
        times.append(float(done.stdout.split()[-1]))
    return sorted(times)[len(times) // 2]


def speed(model: str, prefixes: list[int], threads: int, repeat: int) -> list[dict]:
    """For each prefix of the prose text: llama-cpp-python's own state save and load, then
    save_state / load_state of each preset (medians of `repeat`), the decoder and encoder alone
    on 1 and all cores (scoring excluded), and the memory a save and a load add at their peak."""
    import tempfile

    import llama_cpp

    import nexus_gguf as ng
    from nexus_gguf import backends
    from nexus_gguf.format import NxkvFile
    from nexus_gguf.header import Header
    from nexus_gguf.state_file import decode_state, encode_state

    text = TEXTS["prose"].read_text(encoding="utf-8")
    llm = llama_cpp.Llama(model, n_ctx=max(prefixes) + 64, n_threads=threads, n_batch=512, verbose=False)
    tokens_all = llm.tokenize(text.encode())
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="nxkv-speed-"))
    for n in prefixes:
        if len(tokens_all) < n:
            raise SystemExit(f"{TEXTS['prose']} has {len(tokens_all)} tokens, fewer than {n}")
        llm.reset()
        t = time.perf_counter()
        llm.eval(tokens_all[:n])
        prefill = time.perf_counter() - t
        raw_state = llm.save_state()
        raw_bytes = len(bytes(raw_state.llama_state))
        raw_save = _median_time(llm.save_state, repeat)
        raw_load = _median_time(lambda: llm.load_state(raw_state), repeat)
        print(f"== {n} tokens: prefill {prefill:.2f} s, raw state {raw_bytes / 1e6:.1f} MB, llama-cpp-python "
              f"save {raw_save:.3f} s, load {raw_load:.3f} s", file=sys.stderr)
        for preset in ("lossless", "high"):
            path = tmp / f"{preset}.nxkv"
            llm.load_state(raw_state)
            ng.save_state(llm, path, preset)
            save = _median_time(lambda: ng.save_state(llm, path, preset), repeat)
            # the same with the encoder's working memory bounded to a quarter of the state
            os.environ["NEXUS_GGUF_SAVE_MEMORY"] = BOUNDED_SAVE_MEMORY
            try:
                bounded_save = _median_time(lambda: ng.save_state(llm, path, preset), repeat)
            finally:
                os.environ.pop("NEXUS_GGUF_SAVE_MEMORY", None)
            llm.reset()  # a Llama that holds nothing: no previous sequence to keep for a roll-back
            load = _median_time(lambda: (llm.reset(), ng.load_state(llm, path)), repeat)
            # memory: the first save and load of a new process (a process that saved before holds
            # memory its allocator reuses: later saves peaked 25-45 MB lower at 7680 tokens)
            n_ctx = max(prefixes) + 64
            save_mem = fresh_process_peak(model, n_ctx, threads, "save", state=str(tmp / "lossless.nxkv"), preset=preset,
                                          out=str(tmp / f"{preset}-memory.nxkv"))
            bounded_save_mem = fresh_process_peak(model, n_ctx, threads, "save", state=str(tmp / "lossless.nxkv"),
                                                  preset=preset, out=str(tmp / f"{preset}-memory.nxkv"),
                                                  env={"NEXUS_GGUF_SAVE_MEMORY": BOUNDED_SAVE_MEMORY})
            load_mem = fresh_process_peak(model, n_ctx, threads, "load", path=str(path))
            first_load = fresh_process_load_seconds(model, n_ctx, threads, str(path), repeat)
            f = NxkvFile.open(path)
            h = Header(f.header, f.source)
            decode, encode = {}, {}
            for cores in (1, backends.threads()):
                os.environ["NEXUS_GGUF_THREADS"] = str(cores)
                decode[cores] = _median_time(lambda: decode_state(h.state, h.pipeline, f.section, h.limits()), repeat)
            # the state the encoder starts from: the lossless file decodes to the raw state
            lossless = NxkvFile.open(tmp / "lossless.nxkv")
            lh = Header(lossless.header, lossless.source)
            state = decode_state(lh.state, lh.pipeline, lossless.section, lh.limits())
            for cores in (1, backends.threads()):
                os.environ["NEXUS_GGUF_THREADS"] = str(cores)
                encode[cores] = _median_time(lambda: encode_state(state, h.pipeline, h.state.get("values"), None), repeat)
            os.environ.pop("NEXUS_GGUF_THREADS", None)
            all_cores = backends.threads()
            row = {
                "prefix_tokens": n, "preset": preset, "raw_bytes": raw_bytes, "stored_bytes": path.stat().st_size,
                "prefill_seconds": prefill, "raw_save_seconds": raw_save, "raw_load_seconds": raw_load,
                "save_seconds": save, "load_seconds": load, "load_vs_raw": load / raw_load, "load_vs_prefill": load / prefill,
                "first_load_seconds": first_load,
                "decode_seconds_1": decode[1], "decode_seconds_all": decode[all_cores], "cores": all_cores,
                "decode_gb_s_per_core": raw_bytes / decode[1] / 1e9, "decode_scaling": decode[1] / decode[all_cores],
                "encode_seconds_1": encode[1], "encode_seconds_all": encode[all_cores],
                "encode_mb_s_per_core": raw_bytes / encode[1] / 1e6, "encode_scaling": encode[1] / encode[all_cores],
                "save_peak_extra_bytes": save_mem, "load_peak_extra_bytes": load_mem,
                "bounded_save_seconds": bounded_save, "bounded_save_peak_extra_bytes": bounded_save_mem,
            }
            rows.append(row)
            print(f"  {preset}: load {load:.3f} s ({row['load_vs_raw']:.1f}x raw, 1/{1 / row['load_vs_prefill']:.0f} "
                  f"of the prefill; a new process's first {first_load:.3f} s), decode {row['decode_gb_s_per_core']:.2f} GB/s per core, x{row['decode_scaling']:.2f} "
                  f"on {all_cores}; encode {row['encode_mb_s_per_core']:.0f} MB/s per core; peak +{save_mem / 1e6:.0f} MB "
                  f"saving, +{load_mem / 1e6:.0f} MB loading", file=sys.stderr)
    return rows


def tiny_gemma3(presets: list[str], n_tokens: int = 1700) -> list[dict]:
    """Each preset on a tiny random-weight Gemma 3 (tests/tiny_models.py: iSWA, a base cache and
    a sliding-window one, two KV heads, so that head groups and the basis apply): ratio, each
    cache's K and V error after the restore (RMS of the difference over the RMS of the values
    about their mean), and how far the next logits move from those after the raw restore. The
    weights are random: this checks the layout, not the quality."""
    import tempfile

    import numpy as np

    from nexus_gguf import llama_bridge as bridge
    from nexus_gguf.api import load_state, save_state
    from nexus_gguf.llama_state import parse_state

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import write_tiny_gemma3

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_gemma3(os.path.join(tmp, "tiny-gemma3.gguf"), n_head=4, n_head_kv=2)
        open_model = lambda: bridge.open_llama(model, n_tokens + 64, swa_full=False)  # noqa: E731
        llm = open_model()
        tokens = llm.tokenize(TEXTS["prose"].read_text(encoding="utf-8").encode(), add_bos=False)[:n_tokens]
        llm.eval(tokens)
        raw = bytes(bridge.get_seq_state(llm, 0))
        layout = bridge.model_facts(llm).state_layout()
        saved = parse_state(raw, "sequence", layout)
        other = open_model()
        assert bridge.set_seq_state(other, raw, 0)
        nxt = list(range(20, 36))
        want = bridge.eval_logits(other, nxt, len(tokens))
        for preset in presets:
            path = os.path.join(tmp, f"{preset}.nxkv")
            save_state(llm, path, preset)
            bridge.clear_seq(other, 0)
            load_state(other, path)
            restored = parse_state(bytes(bridge.get_seq_state(other, 0)), "sequence", layout)
            errors = {}
            for (cache, _, a), (_, _, b) in zip(saved.layers(), restored.layers()):
                keep = np.isin(cache.streams[0].cells.pos,
                               next(c for c in restored.caches if c.name == cache.name).streams[0].cells.pos)
                for kind in ("k", "v"):
                    x, y = a.values(kind)[keep], b.values(kind)
                    err = float(np.sqrt(np.mean((x - y) ** 2) / max(np.mean((x - x.mean(axis=0)) ** 2), 1e-30)))
                    key = f"{cache.name} {kind}"
                    errors[key] = max(errors.get(key, 0.0), err)
            got = bridge.eval_logits(other, nxt, len(tokens))
            rows.append({"preset": preset, "ratio": len(raw) / os.path.getsize(path), "errors": errors,
                         "cells": {c.name: len(c.streams[0].cells) for c in restored.caches},
                         "logits_max_diff": float(np.abs(got - want).max())})
    return rows


def tiny_gemma3_table(rows: list[dict]) -> str:
    caches = list(rows[0]["errors"]) if rows else []
    head = "| preset | ratio | cells kept | " + " | ".join(f"{c} error (worst layer)" for c in caches) + " | next logits, max diff |"
    lines = [head, "|" + "---|" * (4 + len(caches))]
    for r in rows:
        cells = ", ".join(f"{k} {v}" for k, v in r["cells"].items())
        errs = " | ".join(f"{r['errors'][c]:.3f}" for c in caches)
        lines.append(f"| `{r['preset']}` | {r['ratio']:.2f}x | {cells} | {errs} | {r['logits_max_diff']:.1e} |")
    return "\n".join(lines)


def speed_table(rows: list[dict]) -> str:
    head = ("| tokens | preset | raw MB | load s | first load s | llama.cpp load s | load / raw | prefill s | load / prefill "
            "| decode GB/s per core | on all cores | encode MB/s per core | save s | peak extra MB saving / loading "
            f"| bounded save ({BOUNDED_SAVE_MEMORY}): s, peak extra MB |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(
            f"| {r['prefix_tokens']} | {r['preset']} | {r['raw_bytes'] / 1e6:.1f} | {r['load_seconds']:.3f} | "
            f"{r['first_load_seconds']:.3f} | "
            f"{r['raw_load_seconds']:.3f} | {r['load_vs_raw']:.1f}x | {r['prefill_seconds']:.1f} | "
            f"1/{1 / r['load_vs_prefill']:.0f} | {r['decode_gb_s_per_core']:.2f} | x{r['decode_scaling']:.2f} on "
            f"{r['cores']} | {r['encode_mb_s_per_core']:.0f} | {r['save_seconds']:.2f} | "
            f"{r['save_peak_extra_bytes'] / 1e6:.0f} / {r['load_peak_extra_bytes'] / 1e6:.0f} | "
            f"{r['bounded_save_seconds']:.2f}, {r['bounded_save_peak_extra_bytes'] / 1e6:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    import llama_cpp

    from nexus_gguf.default_model import default_model_path
    from nexus_gguf.evaluate import context_needed, evaluate
    from nexus_gguf.llama_bridge import software_versions
    from nexus_gguf.pipeline import PRESETS
    from nexus_gguf.progress import Progress
    from nexus_gguf.report import markdown_table, pareto_plot

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1024-token prose prefix only")
    ap.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--out", default=str(ROOT / "bench"), help="output directory (default bench/)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--presets", help="comma-separated (default: all)")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite README.md's table")
    ap.add_argument("--speed", action="store_true", help="save / restore speed and memory only")
    ap.add_argument("--speed-tokens", default="4096,7680", help="prefixes for --speed (default 4096,7680)")
    ap.add_argument("--repeat", type=int, default=5, help="timings per figure for --speed (the median is kept)")
    ap.add_argument("--tiny-gemma3", action="store_true",
                    help="every preset on a tiny random Gemma 3 (iSWA layout; correctness, not quality)")
    args = ap.parse_args(argv)
    if args.tiny_gemma3:
        presets = args.presets.split(",") if args.presets else list(PRESETS)
        rows = tiny_gemma3(presets)
        table = tiny_gemma3_table(rows)
        print(table)
        if not args.no_readme:
            block = (f"Measured by `python tools/bench.py --tiny-gemma3` on "
                     f"{datetime.now(timezone.utc).date().isoformat()}: 1700 prose tokens into a random-weight Gemma 3 "
                     "(6 layers, 4 heads, 2 KV heads of 32, sliding window 8: a base cache and a sliding-window one), "
                     "saved with each preset and restored into a second context. Error: RMS of the restored K or V "
                     "minus the saved one over the RMS of the saved values about their mean, worst layer; next "
                     "logits: 16 tokens after the restore against those after the raw state's restore.\n\n" + table)
            update_readme(ROOT / "README.md", block, GEMMA_BEGIN, GEMMA_END)
        return 0
    if args.speed:
        model = args.model or default_model_path()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows = speed(model, [int(x) for x in args.speed_tokens.split(",")], args.threads, args.repeat)
        meta = {"command": "python tools/bench.py --speed", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": _machine(), "model": os.path.basename(model), "software": software_versions()}
        (out / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
        if not args.no_readme:
            block = (f"Measured by `{meta['command']}` on {meta['date'][:10]} ({meta['machine']}; {meta['model']}; "
                     f"llama-cpp-python {meta['software']['llama_cpp_python']}); medians of {args.repeat}. Load: "
                     "`load_state` into a Llama holding nothing, file read and checksummed included; first load: "
                     f"the same as a new process's first (median of {args.repeat} processes); llama.cpp load: "
                     "llama-cpp-python's own `Llama.load_state` of the raw state. Decode / encode: the codec alone, "
                     "GB/s of reconstructed cache (raw state bytes); scoring excluded. Peak extra: resident memory "
                     "above the level before the call, the first save or load in a new process (freed memory "
                     "returned before the baseline). Bounded save: `NEXUS_GGUF_SAVE_MEMORY="
                     f"{BOUNDED_SAVE_MEMORY}` (the layers being encoded hold at most that fraction of the state, "
                     "plus the rows already given back).\n\n" + speed_table(rows))
            update_readme(ROOT / "README.md", block, SPEED_BEGIN, SPEED_END)
        return 0

    plan = QUICK if args.quick else FULL
    presets = args.presets.split(",") if args.presets else list(PRESETS)
    model = args.model or default_model_path()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "results"
    command = "python tools/bench.py" + (" --quick" if args.quick else "")

    llm = llama_cpp.Llama(model, n_ctx=context_needed(plan["prefixes"], plan["eval_tokens"]), n_threads=args.threads,
                          n_batch=512, verbose=False)
    t0 = time.perf_counter()
    rows = []
    for name in plan["texts"]:
        print(f"== {name} ({TEXTS[name].name})", file=sys.stderr)
        rows += evaluate(
            llm, TEXTS[name].read_text(encoding="utf-8"), text_name=name, presets=presets,
            prefix_tokens=plan["prefixes"], eval_tokens=plan["eval_tokens"],
            ablate=[p for p in plan["ablate"] if p in presets],
            variants=eviction_variants() + transform_variants(), variant_prefixes=plan["eviction_at"],
            recall_trials=plan["recall_trials"], recall_prefixes=plan["recall"].get(name, []),
            progress_factory=lambda label: Progress(label, "tok"), log=lambda s: print(s, file=sys.stderr),
        )
    minutes = (time.perf_counter() - t0) / 60
    meta = {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "model": os.path.basename(model),
        "software": software_versions(),
        "minutes": round(minutes, 1),
    }
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    pareto_plot(rows, str(out / f"{stem}.png"), f"{meta['model']}: stored size vs quality ({command})")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')} in {minutes:.1f} min", file=sys.stderr)
    if not args.quick and not args.no_readme:
        block = (
            f"Measured by `{command}` on {meta['date'][:10]} ({meta['machine']}; {meta['model']}; "
            f"llama-cpp-python {meta['software']['llama_cpp_python']}; {minutes:.0f} min). Ratio: raw state bytes / "
            f"stored bytes, every header byte counted. KLD, top-1, Δp and PPL ratio: the next {plan['eval_tokens']} "
            f"tokens after the restored state against the restore of the raw state. Recall: pass-key hits / trials. "
            f"Times are single runs (save excludes the prefill; load vs prefill compares with reading the prefix "
            f"again). Rows: bench/{stem}.json; plot: bench/{stem}.png.\n\n" + markdown_table(rows)
        )
        update_readme(ROOT / "README.md", block)
        print("README.md table updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
