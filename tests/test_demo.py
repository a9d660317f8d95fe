"""``ncfast demo``: the whole budget for every loss (no stop on a metric); without matplotlib the
logs are written and one line says how to get the figure."""

import sys

import pytest

from ncfast.cli import main
from ncfast.loss_choices import PAPER_LOSSES
from ncfast.training import load_dataset, lr_factor
from ncfast.training.demo import demo_config, run_demo


def test_every_loss_runs_its_whole_schedule():
    data = load_dataset("digits", train_size=64)  # a tiny config: one step per epoch
    epochs = 7
    runs = run_demo(epochs, dataset=data, width=0.125)
    assert [run.loss for run in runs] == list(PAPER_LOSSES)
    for run in runs:
        history, config = run.result.history, run.result.config
        assert [row["epoch"] for row in history] == list(range(1, epochs + 1)), run.loss
        expected_lr = [config.lr * lr_factor(config.schedule, e, epochs) for e in range(epochs)]
        assert [row["lr"] for row in history] == pytest.approx(expected_lr)
        lrs = [row["lr"] for row in history]
        assert lrs[-1] == min(lrs) < 0.1 * config.lr  # the schedule ran to its end
        assert config == demo_config(run.loss, epochs, width=0.125, quiet=True)


def test_cli_demo_without_matplotlib_says_how_to_get_the_figure(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["demo", "--epochs", "1", "--quiet", "--out", str(tmp_path)]) == 0
    assert 'pip install "ncfast[plot]"' in capsys.readouterr().out
    assert not (tmp_path / "nc_vs_epoch.png").exists()
    assert (tmp_path / "demo_ce.csv").exists() and (tmp_path / "demo_rescaled_mse.json").exists()
