"""Peak resident memory of a stretch of code on Linux, for the CPU benchmarks.

``getrusage().ru_maxrss`` is no use here: it is the high-water mark of the process's whole
life, and Linux carries it over fork and exec, so a child started with ``spawn`` reports at
least its parent's peak. Writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` to the
current RSS instead, so ``VmHWM`` afterwards is the peak of what ran in between.
"""
from typing import Optional


def status_kb(field: str) -> Optional[int]:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), or None where absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """``with PeakRSS() as p: ...`` then ``p.mb``: the peak RSS inside the block minus the RSS at
    its start, in MiB (None where VmHWM cannot be reset)."""

    def __enter__(self) -> "PeakRSS":
        self.ok = reset_peak()
        self.before = status_kb("VmRSS")
        self.mb = None
        return self

    def __exit__(self, *exc) -> None:
        peak = status_kb("VmHWM")
        if self.ok and peak is not None and self.before is not None:
            self.mb = (peak - self.before) / 1024.0
