"""The subcommands end to end: logs, figures and tables written; without matplotlib and tqdm
the logs are still written and one line says how to get figures."""

import json
import sys

import pytest

from ncfast.cli import main


def test_cli_train_writes_logs(tmp_path, capsys):
    assert main(["train", "--epochs", "3", "--width", "0.25", "--feature-dim", "16", "--loss", "focal",
                 "--out", str(tmp_path), "--quiet", "--second-pass"]) == 0
    assert "train acc" in capsys.readouterr().out
    log = json.loads((tmp_path / "train_focal.json").read_text())
    assert len(log["history"]) == 3 and log["config"]["loss"] == "focal"
    assert 0 <= log["history"][-1]["ncc_mismatch"] <= 1
    assert len((tmp_path / "train_focal.csv").read_text().splitlines()) == 4
    assert (tmp_path / "train_focal.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["train", "--dataset", "mnist", "--out", str(tmp_path)]) == 2


def test_cli_demo_plumbing(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--threads", "1", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for label in ("CE", "focal g=3", "LS a=0.1", "MSE k=1 b=15"):
        assert label in out
    assert (tmp_path / "nc_vs_epoch.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((tmp_path / "demo_rescaled_mse.json").read_text())["history"]) == 2


def test_cli_ufm(tmp_path, capsys):
    assert main(["ufm", "--classes", "4", "--per-class", "3", "--dim", "5", "--loss", "ce", "--no-bias",
                 "--lambda-w", "1e-2", "--lambda-h", "1e-2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    gap = float(out.split("gap")[1].split()[0])
    assert abs(gap) < 1e-10
    assert (tmp_path / "ufm_ce.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "ufm_ce.csv").read_text().splitlines()) > 10
    assert main(["ufm", "--loss", "ce", "--kappa", "2", "--out", str(tmp_path)]) == 2


@pytest.fixture
def without_plot_extra(monkeypatch):
    """An environment without matplotlib and tqdm: importing them fails."""
    for name in ("matplotlib", "matplotlib.figure", "tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)


def test_cli_without_plot_extra_writes_logs_and_says_how_to_get_figures(tmp_path, capsys, without_plot_extra):
    assert main(["train", "--epochs", "2", "--width", "0.25", "--feature-dim", "16", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    hint = [line for line in out.splitlines() if "figures" in line]
    assert len(hint) == 1 and 'pip install "ncfast[plot]"' in hint[0]
    assert err == ""  # no progress bar without tqdm
    assert len(json.loads((tmp_path / "train_ce.json").read_text())["history"]) == 2
    assert len((tmp_path / "train_ce.csv").read_text().splitlines()) == 3
    assert not (tmp_path / "train_ce.png").exists()
    assert main(["ufm", "--classes", "3", "--per-class", "2", "--dim", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert 'pip install "ncfast[plot]"' in out and (tmp_path / "ufm_mse.csv").exists()
    assert not (tmp_path / "ufm_mse.png").exists()


def test_cli_train_progress_bar_with_tqdm(tmp_path, capsys):
    assert main(["train", "--epochs", "2", "--width", "0.25", "--feature-dim", "16", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "ce:" in err and ("it/s" in err or "s/it" in err)  # tqdm's bar, labelled by the loss, with its rate
