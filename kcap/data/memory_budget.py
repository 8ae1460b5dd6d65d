"""Memory estimates checked before large allocations.

A data set or window size that would need tens of GB should be refused at once with a
message saying what it would need and which parameter to lower, not killed by the kernel
minutes later. Estimates are rough upper bounds (bytes per table row, per rendered token);
the limit is the memory the machine has available (8 GiB where that cannot be read), so a
big machine may build what a small one refuses.
"""
from __future__ import annotations

import os

FALLBACK_BYTES = 8 << 30  # the limit where the available memory cannot be read
# Peak bytes per token while rendering and buffering windows (int64 gather indices, int32
# tokens, labels, the concatenations of the stream's buffer); measured at 13-40 with
# tracemalloc for bioS and bioD, rounded up.
RENDER_BYTES_PER_TOKEN = 64
_ALWAYS_FITS = 64 << 20  # smaller estimates skip reading /proc/meminfo (streams check every read)


def available_bytes() -> int | None:
    """Memory the machine can still give (MemAvailable of /proc/meminfo), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def memory_limit() -> tuple[int, str]:
    """(bytes, what the limit is): the available memory, or 8 GiB where it is unknown."""
    available = available_bytes()
    if available is not None:
        return available, "the memory available on this machine"
    return FALLBACK_BYTES, "8 GiB (this machine's available memory could not be read)"


def format_bytes(n: float) -> str:
    """'512 MiB', '3.2 GiB', '1.5e+03 TiB': binary units, three significant digits."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def check_memory(nbytes: int, what: str, lower: str) -> None:
    """Raise ValueError if ``nbytes`` (an estimate for ``what``) exceeds the memory limit.

    ``lower`` names the parameters that shrink it ("K, D or L"); the message states the
    estimate and the limit.
    """
    if nbytes <= _ALWAYS_FITS:
        return
    limit, which = memory_limit()
    if nbytes > limit:
        raise ValueError(f"{what} would need about {format_bytes(nbytes)} of memory, more than "
                         f"{format_bytes(limit)} ({which}); lower {lower}")
