"""A run's log.jsonl: one JSON record per line (training lines and evaluation lines).

Appends can be torn: a kill or a full disk in the middle of a write leaves a partial last
line. Reading is therefore forgiving, and says what it skipped: a torn last line is dropped,
a line that is not a JSON object is skipped, so a damaged log never blocks a resume. An
append after a torn line starts on a fresh line, so one damaged record never swallows the
next. On resume the log is cut back to the checkpoint's step (``keep_until``), which is
what keeps it free of duplicate records after a kill.
"""
from __future__ import annotations

import json
from pathlib import Path

from kcap.atomic import write_text
from kcap.console import warn

LOG_NAME = "log.jsonl"


def _parse(path: Path, quiet: bool) -> list[dict]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = raw.decode("utf-8", errors="replace").split("\n")
    torn_tail = not raw.endswith(b"\n")
    if not torn_tail:
        lines.pop()  # the empty string after the final newline
    records, skipped = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped.append(number)
    if skipped and not quiet:
        last = len(lines)
        torn = [n for n in skipped if n == last and torn_tail]
        other = [n for n in skipped if n not in torn]
        if torn:
            warn(f"{path}: dropped a torn last line (an append cut short by a kill or a full disk)")
        if other:
            shown = ", ".join(map(str, other[:5])) + (" ..." if len(other) > 5 else "")
            warn(f"{path}: skipped {len(other)} unreadable line(s) (line {shown})")
    return records


def read_log(run_dir, quiet: bool = False) -> list[dict]:
    """The readable records of ``run_dir/log.jsonl`` in file order ([] if there is none).
    Unreadable lines are skipped with a warning on stderr (none when ``quiet``)."""
    return _parse(Path(run_dir) / LOG_NAME, quiet)


def append_record(run_dir, record: dict) -> None:
    """Append one record as a line. If the file ends in a torn line, start a fresh one."""
    path = Path(run_dir) / LOG_NAME
    line = json.dumps(record) + "\n"
    with open(path, "ab+") as f:
        if f.tell() > 0:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))


def keep_until(run_dir, step: int) -> int:
    """Rewrite the log (atomically) keeping the readable records with an integer ``step`` <=
    ``step``: what a run resumed from the checkpoint at ``step`` has already logged. Returns
    how many records were dropped (written after that checkpoint, or without a step)."""
    path = Path(run_dir) / LOG_NAME
    if not path.exists():
        return 0
    records = read_log(run_dir)
    kept = [r for r in records
            if isinstance(r.get("step"), int) and not isinstance(r["step"], bool) and r["step"] <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)
