"""The host's memory allocator, tuned for XLA:CPU (the one platform choice made outside the model).

XLA:CPU allocates one temp buffer per program execution (the seed model's train step: 182 MB,
all activations kept for the backward) and frees it at the end. glibc serves a block that large
with a fresh mmap, or, from the XLA worker threads' own arenas, always with mmap, so every step
page-faults the whole buffer in again: 45k minor faults and ~110 ms of kernel time per seed-model
step on this project's 2-core machine (perf: the faults land in XLA's copies and fusions). Told to
keep freed memory (one arena, no mmap for large blocks, no trimming), glibc hands the same pages
back each step and the faults vanish.

The cost is that memory freed by the process is kept for reuse rather than returned to the OS:
peak RSS is unchanged, it just does not shrink. The corpus is a file-backed memmap and is not
affected. Only done where XLA:CPU runs the model: not on TPU or GPU hosts (their step's memory is
on the device), not outside Linux/glibc, and never when ``GPT2_FLAX_MALLOC=default``.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_INT_MAX = 2**31 - 1  # mallopt takes an int: trimming still happens above 2 GB free (GPT-2 124M)

_state: dict[str, bool] = {}


def _accelerator_present() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms:
        return platforms.split(",")[0].strip() not in ("cpu", "")
    # TPU VMs expose /dev/accel* (v4+) or /dev/vfio; GPU hosts /dev/nvidiactl.
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or os.path.exists("/dev/nvidiactl"))


def tune_allocator() -> bool:
    """Tune glibc malloc for XLA:CPU once per process (see the module doc); True if applied.
    Call before JAX creates its CPU client: threads started earlier keep their own arenas."""
    if "applied" in _state:
        return _state["applied"]
    applied = False
    if (
        sys.platform.startswith("linux")
        and os.environ.get("GPT2_FLAX_MALLOC", "tuned") != "default"
        and not _accelerator_present()
    ):
        try:
            libc = ctypes.CDLL("libc.so.6")
            # One arena: glibc serves large blocks from a thread's own arena by mmap, whatever
            # M_MMAP_MAX says, so XLA's worker threads must share the main (brk) heap.
            applied = all(
                libc.mallopt(param, value) == 1
                for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))
            )
        except (OSError, AttributeError):  # not glibc (musl, ...): leave the allocator alone
            applied = False
    _state["applied"] = applied
    return applied
