"""``prefixpo plot``: metrics.jsonl in, curves.png out; error paths exit 2 with a message."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from prefixpo.cli import main
from prefixpo.plot import PlotError, plot_run, read_metrics


def write_metrics(run_dir: Path, extra_lines: tuple[str, ...] = ()) -> Path:
    rows = [{"step": s, "stage": "sft", "split": "train", "loss": 3.0 / s, "learning_rate": 1e-3} for s in (1, 2, 3)]
    rows += [{"step": 3, "stage": "sft", "split": "eval", "loss": 1.2}]
    for s in (4, 5, 6):
        rows.append({"step": s, "stage": "preference", "split": "train", "loss": 0.7 - 0.1 * (s - 4),
                     "rewards/margins": 0.2 * (s - 4), "rewards/accuracies": 0.5 + 0.2 * (s - 4),
                     "rewards/chosen": 0.1, "rewards/rejected": -0.1, "pairs_per_s": 100.0})
    rows.append({"step": 6, "stage": "preference", "split": "eval", "loss": 0.5, "rewards/margins": 0.3,
                 "rewards/accuracies": 0.9})
    rows.append({"step": 7, "stage": "preference", "split": "train", "pairs_per_s": 90.0})  # no plotted metric
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def test_read_metrics_groups_by_stage_split_metric(tmp_path):
    curves, skipped = read_metrics(write_metrics(tmp_path, ("\n", "{broken\n", '{"stage": "sft"}\n')))
    assert skipped == 2  # the blank line is not counted
    assert curves[("sft", "train", "loss")] == [(1, 3.0), (2, 1.5), (3, 1.0)]
    assert curves[("preference", "eval", "rewards/accuracies")] == [(6, 0.9)]
    assert [s for s, _ in curves[("preference", "train", "rewards/margins")]] == [4, 5, 6]
    assert ("preference", "train", "pairs_per_s") not in curves


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path)
    written = plot_run(tmp_path)
    assert written == [tmp_path / "curves.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written[0].stat().st_size > 1000


def test_plot_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path)
    assert main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")


def test_preference_only_run(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text(json.dumps(
        {"step": 1, "stage": "preference", "split": "eval", "rewards/accuracies": 0.5}) + "\n")
    assert plot_run(tmp_path)[0].stat().st_size > 0


@pytest.mark.parametrize("case", ["no_dir", "no_file", "empty", "no_metric"])
def test_errors_exit_2(tmp_path, capsys, case):
    run_dir = tmp_path / "run"
    if case != "no_dir":
        run_dir.mkdir()
    if case == "empty":
        (run_dir / "metrics.jsonl").write_text("")
    if case == "no_metric":
        (run_dir / "metrics.jsonl").write_text('{"step": 1, "stage": "sft", "split": "train", "tokens_per_s": 5}\n')
    assert main(["plot", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefixpo plot: ") and "Traceback" not in err
    with pytest.raises(PlotError):
        plot_run(run_dir)


def test_missing_matplotlib_exits_2_with_install_command(tmp_path, capsys, monkeypatch):
    write_metrics(tmp_path)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install" in err and "matplotlib" in err
    assert not (tmp_path / "curves.png").exists()


def test_multi_stage_run_draws_every_stage(tmp_path, capsys, monkeypatch):
    """A multi-stage run's directory (no metrics.jsonl of its own) gets one figure, a row per stage."""
    pytest.importorskip("matplotlib")
    from matplotlib import pyplot as plt

    for stage in ("0-sft", "1-preference", "2-preference"):
        (tmp_path / stage).mkdir()
        write_metrics(tmp_path / stage)
    (tmp_path / "notes").mkdir()  # not a stage directory
    shapes = []
    real = plt.subplots

    def recording(nrows, ncols, **kwargs):
        shapes.append((nrows, ncols))
        return real(nrows, ncols, **kwargs)

    monkeypatch.setattr(plt, "subplots", recording)
    assert main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")
    # write_metrics holds an sft and a preference stage: 2 rows per stage directory
    assert shapes == [(6, 3)] and (tmp_path / "curves.png").stat().st_size > 0
