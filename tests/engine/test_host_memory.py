"""The allocator settings for CPU pruning: entered and left cleanly, also on errors and when nested, and given
back when the pass ends, so that what runs after pruning (training, say) reuses freed memory."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

import hf_prune.engine.host_memory as host_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._libc() is None,
                                reason="glibc mallopt only")


def test_heap_for_temporaries_nests_and_restores():
    with host_memory.returning_freed_memory() as applied:
        assert applied
        assert host_memory.allocator_settings() == (host_memory.MMAP_THRESHOLD_BYTES,
                                                    host_memory.DEFAULT_TRIM_THRESHOLD_BYTES)
        with host_memory.heap_for_temporaries():
            with host_memory.heap_for_temporaries():
                assert host_memory._inside == 2
                assert host_memory.allocator_settings()[0] == host_memory.TEMPORARY_MMAP_THRESHOLD_BYTES
                torch.randn(512, 2048).square().sum()  # temporaries of 4 MiB: still valid memory
            assert host_memory._inside == 1
        assert host_memory._inside == 0
        assert host_memory.allocator_settings()[0] == host_memory.MMAP_THRESHOLD_BYTES
        with pytest.raises(RuntimeError, match="boom"):
            with host_memory.heap_for_temporaries():
                raise RuntimeError("boom")
        assert host_memory._inside == 0
    assert host_memory.allocator_settings() == (host_memory.SETTLED_MMAP_THRESHOLD_BYTES,
                                                host_memory.SETTLED_TRIM_THRESHOLD_BYTES)


def test_pass_settings_end_with_the_pass_also_on_errors_and_when_nested():
    with pytest.raises(RuntimeError, match="boom"):
        with host_memory.returning_freed_memory():
            with host_memory.returning_freed_memory():  # the budget search prunes inside a pass
                pass
            assert host_memory.allocator_settings()[0] == host_memory.MMAP_THRESHOLD_BYTES
            raise RuntimeError("boom")
    assert host_memory._pruning == 0
    assert host_memory.allocator_settings()[0] == host_memory.SETTLED_MMAP_THRESHOLD_BYTES
    with host_memory.heap_for_temporaries():  # outside a pass: nothing to change
        assert host_memory._inside == 0
        assert host_memory.allocator_settings()[0] == host_memory.SETTLED_MMAP_THRESHOLD_BYTES


def _page_faults_of_fresh_tensors(count: int = 16, mib: int = 8) -> int:
    """Minor page faults of ``count`` tensors of ``mib`` MiB, each written and freed (after one warm-up)."""
    torch.empty(mib << 18).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(count):
        tensor = torch.empty(mib << 18)
        tensor.fill_(1.0)
        del tensor
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_memory_freed_after_a_pruning_pass_is_reused(tmp_path):
    """During the pass an 8 MiB tensor is a fresh mapping, faulted in on every use; after it (where training
    runs), its freed memory is reused."""
    from tiny_models import tiny_model

    from hf_prune import WandaConfig

    with host_memory.returning_freed_memory():
        during = _page_faults_of_fresh_tensors()
    model = tiny_model("llama")
    model.prune(WandaConfig(sparsity=0.5, device="cpu"),
                calibration_data=torch.randint(0, model.config.vocab_size, (2, 16)))
    after = _page_faults_of_fresh_tensors()
    assert after * 8 < during


def test_prune_model_runs_inside_the_pass_and_leaves_it(monkeypatch):
    """The engine's pruning entry point holds the pass's thresholds while it runs and settles them after."""
    from tiny_models import tiny_model

    import hf_prune.engine.loop as loop
    from hf_prune import WandaConfig

    seen = []
    inner = loop._prune_model

    def spy(*args, **kwargs):
        seen.append((host_memory._pruning, host_memory.allocator_settings()))
        return inner(*args, **kwargs)

    monkeypatch.setattr(loop, "_prune_model", spy)
    model = tiny_model("llama")
    model.prune(WandaConfig(sparsity=0.5, device="cpu"),
                calibration_data=torch.randint(0, model.config.vocab_size, (2, 16)))
    assert seen == [(1, host_memory.PASS_THRESHOLDS)]
    assert host_memory._pruning == 0
    assert host_memory.allocator_settings() == host_memory.SETTLED_THRESHOLDS
