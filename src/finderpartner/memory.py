"""Memory facts: recognising an out-of-memory error, freeing caches, and measuring this process's memory.

Used by the training step (OOM retry), the micro-batch probe and the memory benchmark. On Linux the CPU
figures come from /proc (peak resident set size VmHWM, resettable; MemAvailable); elsewhere from
``resource`` (Unix).
"""

from __future__ import annotations

import gc

import torch

# torch.OutOfMemoryError since torch 2.5; torch.cuda.OutOfMemoryError (the same class there) before.
_OOM_ERROR: type[BaseException] = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def is_oom(error: BaseException) -> bool:
    """A CUDA out-of-memory error, or another backend's RuntimeError saying so (MPS, XPU, a CPU allocation)."""
    return isinstance(error, _OOM_ERROR) or "out of memory" in str(error).lower()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def available_memory_bytes() -> int | None:
    """Memory the kernel could give this process without swapping (None where /proc/meminfo is absent)."""
    return _proc_bytes("/proc/meminfo", "MemAvailable:")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since the last ``reset_peak_rss``."""
    peak = _proc_bytes("/proc/self/status", "VmHWM:")
    if peak is not None:
        return peak
    import resource  # Unix only: imported here so that the module loads on Windows

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    try:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def _proc_bytes(path: str, key: str) -> int | None:
    """A ``key: N kB`` line of a Linux /proc file, in bytes (None where there is no such file or line)."""
    try:
        with open(path, encoding="ascii") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(key)), None)
    except OSError:
        return None
