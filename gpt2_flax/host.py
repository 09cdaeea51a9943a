"""The host's memory allocator, tuned for XLA:CPU (the one platform choice made outside the model).

XLA:CPU allocates one temp buffer per program execution (the seed model's train step: 182 MB,
all activations kept for the backward) and frees it at the end. glibc serves a block that large
with a fresh mmap, or, from the XLA worker threads' own arenas, always with mmap, so every step
page-faults the whole buffer in again: 45k minor faults and ~110 ms of kernel time per seed-model
step on this project's 2-core machine (perf: the faults land in XLA's copies and fusions). Told to
keep freed memory (one arena, no mmap for large blocks, no trimming), glibc hands the same pages
back each step and the faults vanish.

The cost is that memory freed by the process is kept for reuse rather than returned to the OS:
RSS does not shrink. It can also stay above the program's need: when a step's temp buffer is
allocated before the previous one is back (the two overlap at a step boundary), the old block
stays resident beside the new one until a later step reuses it. GPT-2 124M at context 256, batch
4, scanned (2.36 GB temp buffer), settled at 4.8 GB of peak RSS in some runs and 9.4 GB in others,
with no faults after the first steps either way (the 2 GB trim threshold this module used before
peaked at 7.1 GB and faulted 2.4 GB every step); unrolled (1.91 GB, `model.unroll_layers`) at 4.5,
6.3 or 8.2 GB, by run: at most two buffers beside the one in use, reached within the first few
steps and then flat (30 steps). ``GPT2_FLAX_MALLOC=default`` gives glibc's own behaviour
back, at one fault per page of temp buffer per step. The corpus is a file-backed memmap and is not
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
# Never trim: mallopt takes an int, and glibc stores -1 as the size_t SIZE_MAX. The largest int,
# 2 GB, still trimmed GPT-2 124M's 2.36 GB temp buffer (context 256, batch 4) every step: 2.38 GB
# of page faults and 2-2.5 s of kernel time a step, 7.4 s/step, 7.1 GB peak RSS; never trimmed,
# 0 faults, 6.2 s/step, 4.8 GB peak RSS (this project's 2-core AMD VM, 2026-12-03).
_NEVER = -1

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
                for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER))
            )
        except (OSError, AttributeError):  # not glibc (musl, ...): leave the allocator alone
            applied = False
    _state["applied"] = applied
    return applied


def enable_compilation_cache() -> str | None:
    """The CLI keeps XLA's compiled programs on disk, so a second run of the same model and shapes
    skips compiling: the tiny CLI training (init, train step, sampler) 28 s -> 14 s on this
    project's 2-core machine; on a TPU a big model's step compiles for minutes. The folder is
    $GPT2_FLAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/gpt2_flax/xla (~/.cache/gpt2_flax/xla),
    capped at 2 GiB (least recently used programs go first). Off with GPT2_FLAX_COMPILATION_CACHE=0;
    a JAX_COMPILATION_CACHE_DIR the user set is left as it is. Only the CLI does this: the Python
    API leaves the JAX configuration of the user's process alone. Returns the folder (None: off)."""
    chosen = os.environ.get("GPT2_FLAX_COMPILATION_CACHE", "")
    if chosen.lower() in ("0", "off", "false", "no") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = chosen or os.path.join(base, "gpt2_flax", "xla")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:  # a read-only home: compile every time, as without the cache
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_compilation_cache_max_size", 2 * 2**30)
    return folder
