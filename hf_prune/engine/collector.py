"""Forward pre-hooks that sum each targeted operator's input statistics during a layer's pass."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..walker.experts import read_expert_bank
from ..walker.layout import Operator
from .experts import ExpertOutputObserver, routed_forward
from .statistics import InputStatistics, StatKind


class StatisticsCollector:
    """Forward pre-hooks that sum each operator's input statistics.

    Operators fed the very same tensor (q/k/v, gate/up) share one statistics object, so a
    Gram matrix is computed once per distinct input. ``on_ready(op, stats)``, when given,
    runs inside the hook right after the operator's statistics were updated, before the
    operator itself runs: with all samples in one batch that is where one-pass pruning
    happens, and the operator's forward then already uses the pruned weight.

    Slices of fused expert weights have no module of their own: the forward of their
    experts module is replaced, while the collector lives, by one that feeds each expert's
    slices with the tokens routed to that expert only (``engine.experts``;
    ``gate_weighting`` weights each token by its router gate value; ``on_expert_output`` sees
    each expert's output on its tokens).
    """

    def __init__(
        self,
        ops: list[Operator],
        kind_for: Callable[[Operator], StatKind],
        device: torch.device,
        on_ready: Callable[[Operator, InputStatistics | None], None] | None = None,
        gate_weighting: bool = False,
        on_expert_output: ExpertOutputObserver | None = None,
    ) -> None:
        self.device = device
        self.on_ready = on_ready
        self.stats: dict[str, InputStatistics] = {}
        self.done: set[str] = set()
        # inputs seen in this batch, by weak reference: a shared input is recognised by identity
        # while it lives, and the collector never keeps an activation alive (a dead reference
        # matches nothing, so a new tensor at a freed address cannot be taken for it)
        self._batch_inputs: list[tuple[weakref.ref[torch.Tensor], StatKind, InputStatistics]] = []
        self._kinds = {op.name: kind_for(op) for op in ops}
        self._paused = False
        self._handles = [op.module.register_forward_pre_hook(self._hook_for(op)) for op in ops if op.expert is None]
        self._patched: list[tuple[nn.Module, object]] = []
        by_bank: dict[int, list[Operator]] = {}
        for op in ops:
            if op.expert is not None:
                by_bank.setdefault(id(op.module), []).append(op)
        for bank_ops in by_bank.values():
            module = bank_ops[0].module
            self._patched.append((module, module.__dict__.get("forward")))  # accelerate keeps its hook there
            module.forward = routed_forward(read_expert_bank("", module, None), bank_ops,
                                            lambda op, x: self.observe(op, x, remember=False), self._ready_once,
                                            gate_weighting, on_expert_output)

    def _hook_for(self, op: Operator):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if not self._paused:
                self.observe_and_prune(op, inputs[0])

        return hook

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """While active, the hooks ignore their inputs (a probe run of part of the layer)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _observe(self, op: Operator, kind: StatKind, x: torch.Tensor, remember: bool = True) -> None:
        for seen, seen_kind, stats in self._batch_inputs:
            if seen() is x and seen_kind is kind:
                self.stats.setdefault(op.name, stats)
                return
        stats = self.stats.get(op.name) or InputStatistics(op.in_features, kind, self.device)
        stats.update(x)
        self.stats[op.name] = stats
        if remember:
            self._batch_inputs.append((weakref.ref(x), kind, stats))

    def observe(self, op: Operator, x: torch.Tensor, remember: bool = True) -> None:
        """Add ``x`` (the operator's input, or part of it) to its statistics, as its hook would.

        ``remember=False`` for inputs no other operator shares."""
        kind = self._kinds[op.name]
        if kind is not StatKind.NONE:
            self._observe(op, kind, x, remember)

    def mark_ready(self, op: Operator) -> None:
        """In one-pass mode, the operator's statistics are complete: prune it now (its hook then does nothing)."""
        if self.on_ready is not None:
            self.on_ready(op, self.stats.get(op.name))
            self.done.add(op.name)

    def _ready_once(self, op: Operator) -> None:
        if op.name not in self.done:
            self.mark_ready(op)

    def observe_and_prune(self, op: Operator, x: torch.Tensor) -> None:
        """What the operator's hook does with its input ``x`` (also called ahead of its forward)."""
        if op.name not in self.done:
            self.observe(op, x)
            self.mark_ready(op)

    def end_batch(self) -> None:
        """Forget this batch's input tensors (remembered only to detect shared inputs)."""
        self._batch_inputs.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, own_forward in self._patched:
            if own_forward is None:
                del module.forward
            else:
                module.forward = own_forward
        self._patched = []
        self._batch_inputs.clear()
