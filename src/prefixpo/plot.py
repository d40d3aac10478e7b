"""``prefixpo plot RUN_DIR``: training curves from ``RUN_DIR/metrics.jsonl`` as PNG files.

    prefixpo plot runs/quickstart/1-preference    # one stage: writes its curves.png
    prefixpo plot runs/quickstart                 # a multi-stage run: every stage in one curves.png

``metrics.jsonl`` has one JSON object per line with ``step``, ``stage`` (``sft`` or
``preference``), ``split`` (``train`` or ``eval``) and metrics: ``loss`` and, for preference,
``rewards/margins``, ``rewards/accuracies`` (others are ignored). One figure, ``curves.png``, has
one row per stage present, with a loss panel and, for preference, reward margin and reward
accuracy panels; train and eval are two lines in each panel. A line missing a metric is left out of
that panel only; malformed lines are skipped with a warning that counts them.

Needs matplotlib (``pip install 'prefixpo[plot]'`` or ``pip install matplotlib``), drawn with the
Agg backend, so no display is needed. Exit 0 on success, 2 when the run directory or its
metrics file is missing or holds no metric to draw, or when matplotlib is not installed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections import defaultdict
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
OUTPUT_FILE = "curves.png"
STAGES = ("sft", "preference")
SPLITS = ("train", "eval")
# stage -> the panels of its row: (metric key, panel title)
PANELS = {
    "sft": [("loss", "SFT loss")],
    "preference": [("loss", "preference loss"), ("rewards/margins", "reward margin"),
                   ("rewards/accuracies", "reward accuracy")],
}
INSTALL_HINT = "pip install 'prefixpo[plot]'  (or: pip install 'matplotlib>=3.7')"

Curves = dict[tuple[str, str, str], list[tuple[int, float]]]  # (stage, split, metric) -> [(step, value)]


class PlotError(ValueError):
    """A user-facing problem with the run directory or its metrics (exit 2)."""


def read_metrics(path: Path) -> tuple[Curves, int]:
    """The curves of a metrics file and the number of lines skipped as unreadable.

    Only the metrics of ``PANELS`` are kept; a value that is not a finite number is skipped.
    Points are sorted by step.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); p = Path(d) / "metrics.jsonl"
    >>> _ = p.write_text('{"step": 2, "stage": "sft", "split": "train", "loss": 1.5, "lr": 1}\\n'
    ...                  '{"step": 1, "stage": "sft", "split": "train", "loss": 2.0}\\nnot json\\n')
    >>> read_metrics(p)
    ({('sft', 'train', 'loss'): [(1, 2.0), (2, 1.5)]}, 1)
    """
    curves: Curves = defaultdict(list)
    skipped = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step, stage, split = int(row["step"]), row["stage"], row["split"]
            except (ValueError, KeyError, TypeError):
                skipped += 1
                continue
            for metric, _ in PANELS.get(stage, ()):
                value = row.get(metric)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    curves[(stage, split, metric)].append((step, float(value)))
    for points in curves.values():
        points.sort(key=lambda p: p[0])
    return dict(curves), skipped


def metrics_files(run_dir: Path) -> list[tuple[str, Path]]:
    """``(label, metrics file)`` of a run: its own ``metrics.jsonl``, or for a multi-stage run
    (``prefixpo train`` with ``stages``) that of each stage directory ``INDEX-STAGE/``, in order.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for stage in ("1-preference", "0-sft"):
    ...     (d / stage).mkdir(); _ = (d / stage / METRICS_FILE).write_text("")
    >>> [label for label, _ in metrics_files(d)]
    ['0-sft', '1-preference']
    """
    if (run_dir / METRICS_FILE).is_file():
        return [(run_dir.name, run_dir / METRICS_FILE)]
    stages = []
    for sub in run_dir.iterdir():
        index, _, stage = sub.name.partition("-")
        if index.isdigit() and stage in STAGES and (sub / METRICS_FILE).is_file():
            stages.append((int(index), sub.name, sub / METRICS_FILE))
    return [(label, path) for _, label, path in sorted(stages)]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw the curves of a run to ``RUN_DIR/curves.png``; returns the files written. A multi-stage
    run's directory gets one figure with a row per stage (see ``metrics_files``).

    Raises ``PlotError`` when the directory, the metrics or any metric is missing, and
    ``ImportError`` (naming the install command) when matplotlib is not installed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir} is not a directory: give the run directory of a training run")
    files = metrics_files(run_dir)
    if not files:
        raise PlotError(f"{run_dir} has no {METRICS_FILE}, nor stage directories (0-sft/, 1-preference/, ...) "
                        "holding one: the trainer writes it while training; is it a run directory?")
    rows: list[tuple[str, str, Curves]] = []  # (title, stage, curves) per row of panels
    for label, path in files:
        curves, skipped = read_metrics(path)
        if skipped:
            warnings.warn(f"{path}: skipped {skipped} line(s) that are not JSON objects with step, stage and split",
                          stacklevel=2)
        stages = [s for s in STAGES if any(k[0] == s for k in curves)]
        rows += [(f"{label}: " if len(files) > 1 else "", stage, curves) for stage in stages]
    if not rows:
        where = files[0][1] if len(files) == 1 else f"the metrics files of {run_dir}"
        raise PlotError(f"{where} has no metric to plot (lines need step, stage, split and a loss or reward metric)")
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"prefixpo plot needs matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = max(len(PANELS[stage]) for _, stage, _ in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(4.5 * columns, 3.2 * len(rows)), squeeze=False)
    for row, (prefix, stage, curves) in enumerate(rows):
        for col in range(columns):
            ax = axes[row][col]
            if col >= len(PANELS[stage]):
                ax.axis("off")
                continue
            metric, title = PANELS[stage][col]
            for split, style in zip(SPLITS, ("-", "o-")):
                points = curves.get((stage, split, metric))
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, style, label=split, markersize=3, linewidth=1.2)
            if metric == "rewards/accuracies":
                ax.set_ylim(-0.02, 1.02)
            ax.set_title(prefix + title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / OUTPUT_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [out]


def plot_quietly(run_dir: Path) -> None:
    """``curves.png`` of a run; plotting is a convenience, so a missing matplotlib is a note, not a failure."""
    try:
        plot_run(run_dir)
    except Exception as err:
        print(f"note: no plots ({err})", file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help=f"a training run directory: one holding {METRICS_FILE}, "
                        "or a multi-stage run's directory (one row of panels per stage)")


def run(args: argparse.Namespace) -> int:
    try:
        written = plot_run(args.run_dir)
    except (PlotError, ImportError) as e:
        print(f"prefixpo plot: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
