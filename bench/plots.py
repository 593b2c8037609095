"""Pictures of a bench/run.py results file (matplotlib, the ``bench`` extra), written next to it:
- ``<stem>-kernels.png``, ``<stem>-attention.png``, ``<stem>-moe.png``: one panel per op and mode, throughput against size with
  one line per provider (GB/s for the bandwidth-bound ops, with the copy bandwidth measured in the same run as
  a dashed line; TFLOP/s for the matmul-bound ones, with the measured matmul peak); a provider that failed or
  was wrong has no point there (the table says why);
- ``<stem>-end_to_end.png``: tokens/s per provider of the training step, MFU (or share of the measured matmul
  peak) written on each bar;
- ``<stem>-layouts.png``: tokens/s per process of each parallel layout bench/parallel.py timed (gloo
  processes on a CPU).

    python bench/plots.py bench/results/<file>.json    # redraw from a results file
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

if __name__ == "__main__":  # Python put bench/ first on the path: the repository root replaces it
    sys.path[0] = str(Path(__file__).resolve().parents[1])

COLORS = {"evo": "tab:red", "evo-copy": "tab:orange", "evo+compile": "tab:pink", "torch": "tab:blue",
          "torch.compile": "tab:cyan", "reference": "tab:blue", "reference+compile": "tab:cyan",
          "liger": "tab:green", "sdpa-flash": "tab:purple", "sdpa-default": "tab:gray",
          "torch._grouped_mm": "tab:blue", "loop": "tab:olive"}


def _panels(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(op, mode) -> the rows that have a throughput, in order of appearance."""
    panels: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if "size" in row and ("GB_s" in row or "TFLOP_s" in row):
            panels.setdefault((row["op"], row["mode"]), []).append(row)
    return panels


def op_figure(rows: list[dict], title: str, path: Path) -> Path | None:
    """One panel per (op, mode) of ``rows``; None when no row has a throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(rows)
    if not panels:
        return None
    peaks = {r["op"]: r for r in rows if r.get("mode") == "peak"}
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    for ax, ((op, mode), panel) in zip(axes.flat, panels.items()):
        unit = "GB_s" if "GB_s" in panel[0] else "TFLOP_s"
        for provider in dict.fromkeys(r["provider"] for r in panel):
            points = sorted((r["size"], r[unit]) for r in panel if r["provider"] == provider)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider,
                    color=COLORS.get(provider))
        peak = peaks.get("copy" if unit == "GB_s" else "matmul")
        if peak and unit in peak:
            ax.axhline(peak[unit], linestyle="--", color="black", linewidth=0.8,
                       label=f"measured {'copy' if unit == 'GB_s' else 'matmul'} peak")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{op} {mode}", fontsize=9)
        ax.set_xlabel(panel[0]["size_name"])
        ax.set_ylabel("GB/s" if unit == "GB_s" else "TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def end_to_end_figure(rows: list[dict], title: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "tokens_per_s" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 3.6))
    labels = [f"{r['provider']}\n{r.get('layout', '')}" for r in rows]
    bars = ax.bar(labels, [r["tokens_per_s"] for r in rows], color=[COLORS.get(r["provider"], f"C{i % 10}") for i, r in enumerate(rows)])
    for bar, row in zip(bars, rows):
        note = (f"MFU {row['mfu']:.0%}" if "mfu" in row else
                f"{row['matmul_share']:.0%} of matmul peak" if "matmul_share" in row else "")
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel("tokens/s per device" if "layouts" not in title else "tokens/s per process")
    ax.set_title(f"{title}: {rows[0]['case']}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw(results: dict, json_path: Path) -> list[Path]:
    """Every picture of ``results`` (a bench/run.py results dict) next to ``json_path``; the paths written."""
    machine = results["machine"]
    where = machine.get("gpu") or f"CPU ({machine.get('cpus')} cores)"
    title = f"{where}, {results['date'][:10]}, torch {machine['torch']}"
    stem = json_path.with_suffix("")
    written = []
    for name in ("kernels", "attention", "moe"):
        rows = [r for r in results["rows"] if r["benchmark"] == name]
        if rows:
            written.append(op_figure(rows + [r for r in results["rows"] if r.get("mode") == "peak"],
                                     f"{name}: {title}", Path(f"{stem}-{name}.png")))
    rows = [r for r in results["rows"] if r["benchmark"] == "train_step"]
    if rows:
        written.append(end_to_end_figure(rows, f"end to end: {title}", Path(f"{stem}-end_to_end.png")))
    layouts = [{"case": "tiny model, one step, gloo processes", "provider": r["case"].replace("tiny step, ", ""),
                "layout": f"{r['world']} process{'es' if r['world'] > 1 else ''}",
                "tokens_per_s": r["tokens_per_s_per_process"]}
               for r in results["rows"] if r["benchmark"] == "parallel" and r.get("kind") == "time"]
    if layouts:
        written.append(end_to_end_figure(layouts, f"layouts: {title}", Path(f"{stem}-layouts.png")))
    return [p for p in written if p]


if __name__ == "__main__":
    for file in sys.argv[1:]:
        for picture in draw(json.loads(Path(file).read_text()), Path(file)):
            print(picture)
