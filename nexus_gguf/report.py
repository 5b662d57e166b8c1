"""Eval rows as people read them: a terminal table, a Markdown table, a Pareto plot."""

from __future__ import annotations

from typing import Iterable, Optional

KLD_FLOOR = 1e-6  # where lossless points sit on the plot's log axis


def _groups(rows: list[dict]) -> list[tuple[tuple[str, int], list[dict]]]:
    """Rows by (text, prefix), in the order they first appear."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["text"], r["prefix_tokens"]), []).append(r)
    return list(groups.items())


def _recall(r: dict) -> str:
    return "" if r.get("recall_trials") is None else f"{r['recall_hits']}/{r['recall_trials']}"


COLUMNS = [
    # header, width, formatter
    ("candidate", 24, lambda r: r["name"]),
    ("ratio", 7, lambda r: f"{r['ratio']:.2f}x"),
    ("KLD mean", 9, lambda r: f"{r['kld_mean']:.5f}"),
    ("KLD p99", 8, lambda r: f"{r['kld_p99']:.4f}"),
    ("KLD max", 8, lambda r: f"{r['kld_max']:.4f}"),
    ("top-1", 6, lambda r: f"{r['top1']:.3f}"),
    ("Δp RMS", 7, lambda r: f"{100 * r['dp_rms']:.2f}%"),
    ("PPL ratio", 9, lambda r: f"{r['ppl_ratio']:.4f}"),
    ("save s", 7, lambda r: f"{r['save_seconds']:.2f}"),
    ("score s", 7, lambda r: f"{r['save_scoring_seconds']:.2f}" if r.get("save_scoring_seconds") else ""),
    ("load s", 7, lambda r: f"{r['load_seconds']:.2f}"),
    ("recall", 6, _recall),
]


def _heading(text: str, prefix: int, group: list[dict]) -> str:
    r = group[0]
    return (f"{text}: {prefix}-token prefix ({r['raw_bytes']:,} B raw state), {r['eval_tokens']} tokens evaluated; "
            f"prefill took {r['prefill_seconds']:.2f} s")


def text_table(rows: list[dict]) -> str:
    out = []
    for (text, prefix), group in _groups(rows):
        out.append(_heading(text, prefix, group))
        out.append("  ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w, _) in enumerate(COLUMNS)))
        for r in group:
            out.append("  ".join(f"{f(r):<{w}}" if i == 0 else f"{f(r):>{w}}" for i, (_, w, f) in enumerate(COLUMNS)))
        out.append("")
    return "\n".join(out)


def markdown_table(rows: list[dict]) -> str:
    out = []
    for (text, prefix), group in _groups(rows):
        out.append(f"**{_heading(text, prefix, group)}**")
        out.append("")
        out.append("| " + " | ".join(h for h, _, _ in COLUMNS) + " | load vs prefill |")
        out.append("|" + "---|" * (len(COLUMNS) + 1))
        for r in group:
            speed = r["prefill_seconds"] / r["load_seconds"] if r["load_seconds"] > 0 else float("inf")
            cells = [f"`{r['name']}`" if r["kind"] != "baseline" else r["name"]] + [f(r) for _, _, f in COLUMNS[1:]]
            out.append("| " + " | ".join(cells) + f" | {speed:.0f}x faster |")
        out.append("")
    return "\n".join(out)


def frontier(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (kld, ratio) points no other point beats on both (lower KLD, higher ratio), by KLD."""
    best: list[tuple[float, float]] = []
    for kld, ratio in sorted(points, key=lambda p: (p[0], -p[1])):
        if not best or ratio > best[-1][1]:
            best.append((kld, ratio))
    return best


def pareto_plot(rows: list[dict], path: str, title: Optional[str] = None) -> None:
    """Stored-size ratio against mean KLD, one panel per text and prefix: baselines grey with
    their frontier drawn, presets in colour, ablations and variants hollow."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.ticker
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import ConfigError

        raise ConfigError("plotting needs matplotlib: pip install 'nexus-gguf[plot]'") from None
    groups = _groups(rows)
    texts = list(dict.fromkeys(t for (t, _), _ in groups))
    prefixes = sorted({n for (_, n), _ in groups})
    fig, axes = plt.subplots(len(texts), len(prefixes), figsize=(5.5 * len(prefixes), 4.5 * len(texts)), squeeze=False)
    for (text, prefix), group in groups:
        ax = axes[texts.index(text)][prefixes.index(prefix)]
        x = lambda r: max(r["kld_mean"], KLD_FLOOR)  # noqa: E731
        base = [r for r in group if r["kind"] == "baseline"]
        front = frontier((x(r), r["ratio"]) for r in base)
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.6", ls="--", lw=1,
                label="baseline frontier")
        for r in group:
            style = {"baseline": dict(color="0.5", marker="o"), "preset": dict(color="C0", marker="D", s=40),
                     "ablation": dict(facecolors="none", edgecolors="C1", marker="s"),
                     "variant": dict(facecolors="none", edgecolors="C2", marker="^")}[r["kind"]]
            ax.scatter([x(r)], [r["ratio"]], zorder=3, **style)
            ax.annotate(r["name"], (x(r), r["ratio"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel(f"mean KLD vs raw restore (lossless drawn at {KLD_FLOOR:g})")
        ax.set_ylabel("raw state bytes / stored bytes")
        ax.set_title(f"{text}, {prefix}-token prefix", fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
