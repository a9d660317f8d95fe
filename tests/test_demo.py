"""``ncfast demo``: the whole budget for every loss (no stop on a metric), the table and the figure."""

import json
import sys

import pytest

from ncfast.cli import main
from ncfast.training import load_dataset, lr_factor
from ncfast.training.demo import DEMO_LOSSES, demo_config, run_demo


def test_every_loss_runs_its_whole_schedule():
    data = load_dataset("digits", train_size=64)  # a tiny config: one step per epoch
    epochs = 7
    runs = run_demo(epochs, dataset=data, width=0.125)
    assert [run.loss for run in runs] == [loss for loss, _ in DEMO_LOSSES]
    for run in runs:
        history, config = run.result.history, run.result.config
        assert [row["epoch"] for row in history] == list(range(1, epochs + 1)), run.loss
        expected_lr = [config.lr * lr_factor(config.schedule, e, epochs) for e in range(epochs)]
        assert [row["lr"] for row in history] == pytest.approx(expected_lr)
        lrs = [row["lr"] for row in history]
        assert lrs[-1] == min(lrs) < 0.1 * config.lr  # the schedule ran to its end
        assert config == demo_config(run.loss, epochs, width=0.125, quiet=True)


def test_cli_demo_writes_table_logs_and_figure(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--threads", "1", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for label in ("CE", "focal g=3", "LS a=0.1", "MSE k=1 b=15"):
        assert label in out
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    for loss, _ in DEMO_LOSSES:
        assert len(json.loads((tmp_path / f"demo_{loss}.json").read_text())["history"]) == 2


def test_cli_demo_without_matplotlib_says_how_to_get_the_figure(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["demo", "--epochs", "1", "--quiet", "--out", str(tmp_path)]) == 0
    assert "pip install" in capsys.readouterr().out
    assert not (tmp_path / "demo.png").exists()
    assert (tmp_path / "demo_ce.csv").exists()


def test_cli_demo_out_must_be_a_folder(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("")
    assert main(["demo", "--epochs", "1", "--out", str(target)]) == 2
    assert "--out" in capsys.readouterr().err
