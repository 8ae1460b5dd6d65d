"""Messages to the person at the terminal: notes and warnings on stderr, one line each,
written through tqdm so that they never garble a progress bar that is on screen."""
from __future__ import annotations

import sys


def _write(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)


def warn(message: str) -> None:
    """``kcap: warning: message`` on stderr."""
    _write(f"kcap: warning: {message}")


def note(message: str) -> None:
    """``kcap: message`` on stderr (what a run is doing: its plan, where it resumes from)."""
    _write(f"kcap: {message}")
