#!/usr/bin/env python3
"""The project's benchmark: every preset, the ablations of `high` and `seed`, and every baseline on SmolLM2-135M,
prose and source code, prefixes of 1024, 4096 and 7680 tokens, in one run on one machine.

    python tools/bench.py            # the full matrix (about an hour on 2 cores): writes
                                     # bench/results.json, bench/pareto.png and README's table
    python tools/bench.py --quick    # 1024-token prose prefix only (a few minutes): writes
                                     # bench/quick.json and bench/quick.png, README untouched

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
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXTS = {"prose": ROOT / "tests/data/prose_long.txt", "code": ROOT / "tests/data/code.txt"}
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"

FULL = dict(texts=["prose", "code"], prefixes=[1024, 4096, 7680], eval_tokens=256, recall_trials=4,
            recall={"prose": [4096]}, ablate=["high", "seed"], eviction_at=[4096])
QUICK = dict(texts=["prose"], prefixes=[1024], eval_tokens=128, recall_trials=2, recall={"prose": [1024]},
             ablate=["high"], eviction_at=[1024])


def eviction_variants():
    """`high`'s lattice after evicting 25 / 50 / 75 % of the tokens, chosen by the real
    attention of the last 32 prompt tokens or by the key-key proxy."""
    from nexus_gguf.eviction import Eviction, Scoring
    from nexus_gguf.pipeline import Pipeline, build_pipeline

    out = []
    for evicted in (25, 50, 75):
        for scorer in ("attention", "key-proxy"):
            eviction = Eviction(keep=1 - evicted / 100)
            out.append(Pipeline(build_pipeline("high").stages, f"high+evict{evicted}/{scorer}", eviction, Scoring(scorer=scorer)))
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
    return f"{cpu}, {os.cpu_count()} threads, {platform.system()}"


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} markers")
    readme.write_text(pattern.sub(lambda _: f"{README_BEGIN}\n{block}\n{README_END}", text), encoding="utf-8")


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
    args = ap.parse_args(argv)

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
            variants=eviction_variants(), variant_prefixes=plan["eviction_at"],
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
