"""Progress bars: tqdm's, drawn from the first step on; silent when disabled or without tqdm."""

import sys

from ncfast.progress import progress_bar


def test_tqdm_bar_counts_steps(capsys):
    bar = progress_bar(4, "train")
    assert capsys.readouterr().err == ""  # nothing before the first step
    for step in range(4):
        bar.update(1)
        bar.set_postfix_str(f"loss {step}", refresh=True)
    bar.close()
    err = capsys.readouterr().err
    assert "train:" in err and "4/4" in err and "loss 3" in err


def test_disabled_and_missing_tqdm_are_silent(capsys, monkeypatch):
    bar = progress_bar(3, "quiet", enabled=False)
    bar.update(1)
    bar.set_postfix_str("x")
    bar.close()
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    bar = progress_bar(3, "no tqdm")
    bar.update(1)
    bar.close()
    assert capsys.readouterr().err == ""
