"""Progress bars: tqdm's when it is installed (the optional ``plot`` extra), otherwise none."""

from __future__ import annotations


class _Bar:
    """A tqdm bar drawn from the first completed step on, so that input refused before any work
    leaves nothing on the terminal but its one-line error; silent without tqdm."""

    def __init__(self, total: int, label: str, enabled: bool):
        self._total, self._label, self._enabled = total, label, enabled
        self._bar = None

    def update(self, n: int = 1) -> None:
        if self._bar is None and self._enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self._enabled = False
                return
            self._bar = tqdm(total=self._total, desc=self._label, dynamic_ncols=True, leave=False)
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=refresh)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def progress_bar(total: int, label: str, enabled: bool = True) -> _Bar:
    """A bar over ``total`` steps on stderr: ``bar.update(1)``, ``bar.set_postfix_str(text)``,
    ``bar.close()``. Nothing is drawn when ``enabled`` is false or tqdm is not installed."""
    return _Bar(total, label, enabled)
