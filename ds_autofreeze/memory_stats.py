"""Peak memory of a region of code: what a repartition costs beyond the state it ends with.

On an accelerator, the allocator's own peak (``max_memory_allocated``, reset on entry). On the CPU,
where torch allocates large tensors with mmap and returns them on free, the process's resident set
sampled by a thread every millisecond (a peak shorter than that can be missed; repartitions allocate
and copy tensors of megabytes and more, which takes longer).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.before``, ``peak.peak``, ``peak.after``
    (bytes) and ``peak.extra`` (peak minus before)."""

    def __init__(self, device: Any = "cpu"):
        self.device = torch.device(device)
        self.before = self.peak = self.after = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def extra(self) -> int:
        return self.peak - self.before

    def _current(self) -> int:
        if self.device.type == "cpu":
            return resident_bytes()
        return torch.cuda.memory_allocated(self.device)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.001)

    def __enter__(self) -> "PeakMemory":
        self.before = self.peak = self._current()
        if self.device.type == "cpu":
            self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
            self._thread.start()
        else:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        self.after = self._current()
        self.peak = max(self.peak, self.after)
