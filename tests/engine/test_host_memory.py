"""The allocator settings for CPU pruning: entered and left cleanly, also on errors and when nested."""

from __future__ import annotations

import sys

import pytest
import torch

import hf_prune.engine.host_memory as host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_heap_for_temporaries_nests_and_restores():
    assert host_memory.return_freed_memory_to_os()
    with host_memory.heap_for_temporaries():
        with host_memory.heap_for_temporaries():
            assert host_memory._inside == 2
            torch.randn(512, 2048).square().sum()  # temporaries of 4 MiB: still valid memory
        assert host_memory._inside == 1
    assert host_memory._inside == 0
    with pytest.raises(RuntimeError, match="boom"):
        with host_memory.heap_for_temporaries():
            raise RuntimeError("boom")
    assert host_memory._inside == 0
