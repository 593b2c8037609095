"""Curves of a run from its metrics.jsonl: ``curves.png`` in the run folder, and several runs on one picture
(``scripts/plot.py``).

Five panels, by step: the training loss (and each dataset type's, ``loss/<type>``), the validation losses
(``val/<name>_loss``), the learning rate, the gradient norm, and tokens per second per device (``tgs``). Runs
drawn together share the axes, one colour per run. matplotlib is an optional dependency (``pip install
matplotlib``, or evo's ``plot`` extra): without it nothing is drawn and ``draw_curves`` returns None.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (("training loss", lambda key: key == "loss" or key.startswith("loss/")),
          ("validation loss", lambda key: key.startswith("val/") and key.endswith("_loss")),
          ("lr", lambda key: key == "lr"), ("gradient norm", lambda key: key == "grad_norm"),
          ("tokens/s per device", lambda key: key == "tgs"))


def read_metrics(run_folder: Path) -> list[dict]:
    """The records of ``run_folder/metrics.jsonl`` (a last line cut short by a kill is left out)."""
    records = []
    path = Path(run_folder) / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else ():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} of every numeric metric, nulls (a skipped step's norm) left out."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = out.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return out


def draw_curves(run_folders: list[Path], out: Path) -> Path | None:
    """Draw the runs' curves into ``out`` (PNG); returns it, or None without matplotlib."""
    try:  # a Figure of its own on the Agg canvas: no display, and pyplot's global backend is left alone
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(15, 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    for index, folder in enumerate(run_folders):
        data = series(read_metrics(folder))
        colour = f"C{index % 10}"
        for ax, (title, wanted) in zip(axes, PANELS):
            keys = sorted(k for k in data if wanted(k))
            for n, key in enumerate(keys):
                steps, values = data[key]
                label = f"{Path(folder).name}: {key}" if len(run_folders) > 1 else key
                ax.plot(steps, values, color=colour, linestyle=("-", "--", ":", "-.")[n % 4], label=label,
                        marker="o" if len(steps) < 30 else None, markersize=3)
            ax.set_title(title)
            ax.set_xlabel("step")
    for ax in axes[:len(PANELS)]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[len(PANELS)].axis("off")
    fig.suptitle(", ".join(Path(f).name for f in run_folders))
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=80, format="png")
    tmp.replace(out)  # a reader never sees half a picture
    return out
