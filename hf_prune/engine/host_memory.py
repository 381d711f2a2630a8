"""Give freed activation memory back to the operating system during CPU pruning, and only then.

glibc serves large allocations from its heap once a large block has been freed (its mmap
threshold grows dynamically), so the activation tensors of one decoder layer stay in the
process's resident memory after they are freed and the next layer's land beside them: the
resident size creeps up layer after layer. While a model is pruned (``returning_freed_memory``)
the threshold is fixed at 1 MiB, so every allocation of 1 MiB or more is a separate mapping
that is returned to the system when the tensor is freed.

That makes each temporary of a few MiB a fresh mapping whose pages are faulted in again on
every use: FISTA's solver, whose iterations make dozens of such temporaries, ran 2.7x
slower with it (18.7 s instead of 6.9 s for a 576 x 1536 operator). Such compute-bound
stretches run inside ``heap_for_temporaries()``. When the pruning pass ends, the thresholds
go to the most glibc's own dynamic ones reach (mmap at 32 MiB, trim at 64 MiB), since glibc
cannot be given its dynamic behaviour back: a model trained after it was pruned in the same
process would otherwise fault in every tensor of 1 MiB or more afresh (a training step of a
SmolLM2 2:4 student took 1.2-1.4x as long).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
import threading
from collections.abc import Iterator

from transformers.utils import logging

logger = logging.get_logger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
DEFAULT_TRIM_THRESHOLD_BYTES = 128 << 10  # glibc's default
TEMPORARY_MMAP_THRESHOLD_BYTES = 16 << 20
TEMPORARY_TRIM_THRESHOLD_BYTES = 32 << 20
SETTLED_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where the dynamic one stops
SETTLED_TRIM_THRESHOLD_BYTES = 64 << 20  # the dynamic trim threshold: twice the mmap threshold
PASS_THRESHOLDS = (MMAP_THRESHOLD_BYTES, DEFAULT_TRIM_THRESHOLD_BYTES)
TEMPORARY_THRESHOLDS = (TEMPORARY_MMAP_THRESHOLD_BYTES, TEMPORARY_TRIM_THRESHOLD_BYTES)
SETTLED_THRESHOLDS = (SETTLED_MMAP_THRESHOLD_BYTES, SETTLED_TRIM_THRESHOLD_BYTES)
_lock = threading.Lock()
_pruning = 0  # pruning passes inside returning_freed_memory()
_inside = 0  # threads inside heap_for_temporaries() during a pruning pass
_settings: tuple[int, int] | None = None  # (mmap, trim) thresholds hf_prune last set; None: glibc's own
_pass_applied = False  # whether the pruning pass's thresholds took


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018  (musl and other libcs without it)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def _set(thresholds: tuple[int, int], trim: bool = False) -> bool:
    global _settings
    mmap_threshold, trim_threshold = thresholds
    libc = _libc()
    if libc is None:
        return False
    applied = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if applied:
        _settings = thresholds
    else:
        logger.warning("glibc refused the malloc thresholds %s (mmap, trim bytes); the ones before stay", thresholds)
    if trim:
        libc.malloc_trim(0)
    return applied


def allocator_settings() -> tuple[int, int] | None:
    """The (mmap, trim) thresholds in bytes hf_prune last gave glibc, None if it never did."""
    return _settings


@contextlib.contextmanager
def returning_freed_memory() -> Iterator[bool]:
    """While inside (a pruning pass), every allocation of 1 MiB or more is its own mapping, returned
    to the system when freed; yields whether that could be set (False where there is no glibc).
    When the last pass leaves, the free heap is returned and the thresholds settle at 32 MiB
    (mmap) and 64 MiB (trim), the most glibc's own dynamic thresholds reach."""
    global _pruning, _pass_applied
    try:
        with _lock:
            _pruning += 1
            if _pruning == 1:
                _pass_applied = _set(PASS_THRESHOLDS)
                logger.debug("glibc mmap threshold fixed at %d bytes for the pruning pass: %s", MMAP_THRESHOLD_BYTES,
                             _pass_applied)
        yield _pass_applied
    finally:
        with _lock:
            _pruning -= 1
            if _pruning == 0 and _pass_applied:
                _set(SETTLED_THRESHOLDS, trim=True)


@contextlib.contextmanager
def heap_for_temporaries() -> Iterator[None]:
    """Inside a pruning pass: while inside, allocations below 16 MiB reuse freed heap memory (and up
    to 32 MiB of free heap is kept); when the last thread leaves, the pass's thresholds come back
    and the free heap is returned to the system. Does nothing outside a pruning pass."""
    global _inside
    with _lock:
        active = _pruning > 0 and _pass_applied
        if active:
            _inside += 1
            if _inside == 1:
                _set(TEMPORARY_THRESHOLDS)
    try:
        yield
    finally:
        if active:
            with _lock:
                _inside -= 1
                if _inside == 0:
                    _set(PASS_THRESHOLDS if _pruning else SETTLED_THRESHOLDS, trim=True)
