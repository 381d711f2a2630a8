"""Give freed activation memory back to the operating system during CPU pruning.

glibc serves large allocations from its heap once a large block has been freed (its mmap
threshold grows dynamically), so the activation tensors of one decoder layer stay in the
process's resident memory after they are freed and the next layer's land beside them: the
resident size creeps up layer after layer. Fixing the threshold makes every allocation of
1 MiB or more a separate mapping that is returned to the system when the tensor is freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from transformers.utils import logging

logger = logging.get_logger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20
_applied = False


def return_freed_memory_to_os() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (once per process); False where there is no glibc."""
    global _applied
    if _applied or not sys.platform.startswith("linux"):
        return _applied
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        _applied = False
    logger.debug("glibc mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD_BYTES, _applied)
    return _applied
