"""Per-stage wall time and peak memory, one line each, for a pipeline a user waits on.

Peak resident memory per stage comes from Linux's VmHWM, which writing 5 to /proc/self/clear_refs
resets at each stage start; elsewhere the line gives the process's peak so far (ru_maxrss).
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

STAGE_PREFIX = "stage "
_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def release_memory() -> None:
    """Collect unreachable objects and hand freed heap pages back to the OS (glibc), so that what an
    earlier stage freed does not stay resident through the next one."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory since the last reset (Linux) or of the whole process."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@dataclass
class Stages:
    """Times named stages; `echo` gets `stage NAME: 12.3 s, peak 1.84 GB` as each one ends."""

    echo: Callable[[str], None] = print
    done: list[tuple[str, float, int]] = field(default_factory=list)  # (name, seconds, peak bytes)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        release_memory()
        per_stage = _reset_peak()
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        peak = peak_rss_bytes()
        self.done.append((name, seconds, peak))
        what = "peak" if per_stage else "process peak so far"
        self.echo(f"{STAGE_PREFIX}{name}: {seconds:.1f} s, {what} {peak / 1e9:.2f} GB")

    def total(self) -> float:
        return sum(s for _, s, _ in self.done)
