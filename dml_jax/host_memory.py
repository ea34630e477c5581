"""Keeping freed host memory in the process, so that XLA:CPU's per-call buffers stop faulting.

XLA's CPU runtime allocates each call's temporary buffer (every intermediate of a jitted step,
e.g. a loss's ``[B, B]`` or ``[B, B + M]`` matrices) with ``malloc`` and frees it when the call
ends. glibc's ``malloc`` serves a request past its ``mmap`` threshold (at most 32 MB), or one
too large for a worker thread's arena (64 MB heaps), by mapping fresh pages and unmapping them
on ``free``; so every call touches its buffer page by page again, one page fault per 4 KB. On
the 2-core machines in ``README.md`` a 50 MB buffer (the triplet step at ``B = 1024`` before its
fallback miner was made smaller) cost 3-5 ms of a 17 ms step, and the 126-829 MB buffers of the
losses with a cross-batch memory of 8,192 rows 40-120 ms of their 120-330 ms steps, as much as
a matmul; see ``docs/losses.md`` ("Host memory").

:func:`retain_freed_memory` tells glibc to keep what is freed (one arena, no ``mmap`` for
large blocks, no trimming), so the next call reuses the same pages. It is a process-wide
setting, which is the application's to make, not a library's: dml_jax's own entry points
(``experiments/*.py``, ``benchmarks/losses.py``) call it at start; call it at the start of
your own program, before JAX runs anything, if you want the same. The process's resident
memory then stays at its peak instead of shrinking between steps. Other allocators
(tcmalloc, jemalloc, e.g. via ``LD_PRELOAD``) cache freed memory themselves and need nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def retain_freed_memory() -> bool:
    """Makes glibc's ``malloc`` keep freed memory in the process (see the module docstring).

    Sets ``M_ARENA_MAX = 1`` (every thread allocates from the main heap, which grows without
    the 64 MB limit of per-thread heaps), ``M_MMAP_MAX = 0`` (no block is mapped on its own)
    and the largest ``M_TRIM_THRESHOLD`` (the heap is never given back). Call it once, early:
    threads that already have an arena keep it. Idempotent.

    Returns:
      True when the settings were applied (glibc), False elsewhere (nothing changed).
    """
    libc = _glibc()
    if libc is None:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)
