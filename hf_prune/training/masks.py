"""Masks of pruned weights, kept while a pruned model trains.

``SparsityMasks`` finds the pruned entries of a model's decoder operators and can zero their
gradients and re-zero the weights. Which entries are pruned comes from the model's pruning
record (its pattern and which operators it pruned) and from the zeros in the weights when
the masks are built:

* unstructured: one ``bool`` mask per pruned weight (1 byte per entry);
* N:M: nothing is stored (unless ``store_nm=True``); before the optimizer step the pruned
  entries are the zeros, after it any group of ``M`` consecutive inputs with more than ``N``
  non-zeros is cut back to its ``N`` largest magnitudes;
* structured pruning removes rows and columns, so a shrunk model has no zeros and needs no
  mask at all.

Only trainable weights get a mask: a frozen base under a LoRA adapter needs none.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint.record import check_operator, check_weights_against_record, recorded_sparsity
from ..methods.patterns import Pattern, lowest_per_group, parse_pattern
from ..walker.layout import decoder_operators, unwrap_model


def pruning_record(model: nn.Module) -> dict[str, Any] | None:
    """The ``pruning_config`` record of a (possibly wrapped) model's config, if any."""
    record = getattr(getattr(unwrap_model(model), "config", None), "pruning_config", None)
    return record if isinstance(record, dict) and record else None


_ADVICE = ("it was changed after pruning without hf_prune's SparsityCallback (or merged with a dense adapter "
           "by peft's merge_and_unload); prune it again, or build masks from its current zeros with "
           "pattern='unstructured'")


def check_pruned_weights(model: nn.Module) -> int:
    """Check every pruned decoder weight against the model's pruning record; returns how many were checked.

    Unlike the check on load, this also works on a model wrapped by peft or DDP.
    """
    record = pruning_record(model)
    if record is None:
        return 0
    return check_weights_against_record(decoder_operators(model), record, _ADVICE)


def _as_out_in(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    return tensor.t() if transposed else tensor


@dataclass
class MaskedWeight:
    """One pruned weight. ``keep`` is a bool tensor in the weight's storage layout, ``True`` where
    the entry is kept, or ``None`` when the N:M mask is recomputed from the weight itself.

    ``weight`` is the whole parameter; for one expert's slice of a fused expert weight
    (``expert`` set) :meth:`part` takes that slice of it, of its gradient or optimizer state.
    """

    name: str
    module: nn.Module
    transposed: bool
    keep: torch.Tensor | None = None
    parameter: str = "weight"
    expert: int | None = None

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.parameter)

    def part(self, tensor: torch.Tensor) -> torch.Tensor:
        """This entry's slice of a tensor shaped like the whole parameter."""
        return tensor[self.expert] if self.expert is not None else tensor


def _group_view(weight: torch.Tensor, transposed: bool, m: int) -> torch.Tensor:
    view = _as_out_in(weight, transposed)
    rows, cols = view.shape
    return view.reshape(rows, cols // m, m)


class SparsityMasks:
    """The pruned entries of a model, with the two operations training needs.

    ``zero_gradients()`` before the optimizer step, ``apply()`` after it: the gradient of a
    pruned entry never reaches the optimizer, and whatever the optimizer does anyway
    (momentum from an older state, weight decay, a custom rule) is undone. A recomputed N:M
    mask cannot tell a revived entry from a kept one, so with an optimizer that already has
    state also call ``clear_optimizer_state()`` once before the first step. Use
    ``SparsityCallback`` with ``transformers.Trainer``; call the two methods yourself in a
    hand-written (accelerate) loop.

    Masks multiply (``mul_`` by a bool tensor is several times faster than ``masked_fill_`` on
    CPU); a weight or gradient that is already NaN stays NaN.
    """

    def __init__(self, entries: list[MaskedWeight], pattern: Pattern) -> None:
        self.entries = entries
        self.pattern = pattern
        self.seconds = 0.0  # time spent zeroing gradients and re-applying masks
        self._hooks: list[Any] = []

    @classmethod
    def from_model(cls, model: nn.Module, pattern: str | None = None, trainable_only: bool = True,
                   store_nm: bool = False) -> SparsityMasks:
        """Masks of ``model``'s pruned decoder weights.

        Args:
            model: a pruned causal LM (also inside a peft ``PeftModel`` or a DDP wrapper).
            pattern: ``"unstructured"`` or ``"N:M"``; default the pattern of the model's pruning
                record, else ``"unstructured"`` (every exact zero counts as pruned).
            trainable_only: skip weights with ``requires_grad=False`` (they cannot change).
            store_nm: store bool masks for N:M too (faster steps, 1 byte per weight) instead of
                recomputing them from the weights.

        Raises:
            PruningRecordMismatchError: the weights have fewer zeros than the record says, or
                lost its N:M pattern (the model was changed without keeping the masks).
        """
        record = pruning_record(model)
        parsed = parse_pattern(pattern or (record or {}).get("pattern") or "unstructured")
        recorded = recorded_sparsity(record)
        entries: list[MaskedWeight] = []
        for op in decoder_operators(model):
            if trainable_only and not op.parameter_tensor().requires_grad:
                continue
            if record is not None and op.name in recorded and recorded[op.name] <= 0:
                continue
            check_operator(op, recorded.get(op.name), parsed, _ADVICE)
            keep = op.stored_weight().detach() != 0
            if bool(keep.all()):
                continue
            stored = keep if (store_nm or not parsed.is_nm) else None
            entries.append(MaskedWeight(op.name, op.module, op.transposed, stored, op.parameter, op.expert))
        return cls(entries, parsed)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def memory_bytes(self) -> int:
        """Bytes held by stored masks (zero for N:M masks that are recomputed)."""
        return sum(e.keep.numel() * e.keep.element_size() for e in self.entries if e.keep is not None)

    def owns(self, model: nn.Module) -> bool:
        """Whether these masks were built from ``model``'s current modules."""
        modules = {id(op.module) for op in decoder_operators(model)}
        return all(id(e.module) in modules for e in self.entries)

    @staticmethod
    def _zero_gradient(entry: MaskedWeight, grad: torch.Tensor) -> None:
        # Before the optimizer step every pruned entry is exactly zero, so for a recomputed N:M
        # mask the non-zeros are the kept entries (cheaper than ranking the magnitudes).
        keep = entry.keep if entry.keep is not None else entry.part(entry.weight.detach()) != 0
        entry.part(grad).mul_(keep.to(grad.device))

    @torch.no_grad()
    def zero_gradients(self) -> None:
        """Set the gradient of every pruned entry to zero (before the optimizer step)."""
        start = time.perf_counter()
        for entry in self.entries:
            if entry.weight.grad is not None:
                self._zero_gradient(entry, entry.weight.grad)
        self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def apply(self) -> None:
        """Set every pruned weight back to exactly zero (after the optimizer step).

        A recomputed N:M mask first checks each weight's groups; only a weight with a group of
        more than ``N`` non-zeros is re-pruned, to the ``N`` largest magnitudes of each group.
        """
        start = time.perf_counter()
        for entry in self.entries:
            weight = entry.part(entry.weight.data)
            if entry.keep is not None:
                weight.mul_(entry.keep.to(weight.device))
                continue
            n, m = self.pattern.n, self.pattern.m
            if bool((_group_view(weight, entry.transposed, m) != 0).sum(-1, dtype=torch.int16).gt(n).any()):
                view = _as_out_in(weight, entry.transposed)
                view.masked_fill_(lowest_per_group(view.abs(), n, m), 0)
        self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def clear_optimizer_state(self, optimizer: Any) -> int:
        """Zero the optimizer's per-entry state (Adam's moments, momentum) of pruned entries.

        Needed once when the optimizer already has state for them (a dense run's optimizer, a
        state loaded from elsewhere); from then on zero gradients keep that state zero. Call it
        before the step, while the pruned weights are zero. Returns the state tensors changed.
        """
        while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer and similar wrappers
            optimizer = optimizer.optimizer
        state = getattr(optimizer, "state", None)
        if not state:
            return 0
        changed = 0
        for entry in self.entries:
            for value in state.get(entry.weight, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == entry.weight.shape:
                    self._zero_gradient(entry, value)
                    changed += 1
        return changed

    def register_gradient_hooks(self) -> None:
        """Zero pruned gradients as soon as backward accumulates them (once per micro-batch).

        Then gradient clipping and the logged gradient norm count only the kept weights. With
        multi-process data parallelism, gradient reduction may write ``.grad`` after these hooks:
        call ``zero_gradients()`` before the step as well.
        """
        if self._hooks:
            return
        for entry in self.entries:
            def hook(param: torch.Tensor, entry: MaskedWeight = entry) -> None:
                if param.grad is not None:
                    start = time.perf_counter()
                    with torch.no_grad():
                        self._zero_gradient(entry, param.grad)
                    self.seconds += time.perf_counter() - start

            self._hooks.append(entry.weight.register_post_accumulate_grad_hook(hook))

    @property
    def hooks_registered(self) -> bool:
        return bool(self._hooks)

    def remove_gradient_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @torch.no_grad()
    def violations(self) -> int:
        """Pruned entries that are not zero now (0 when the masks hold).

        For recomputed N:M masks, the number of groups of ``M`` with more than ``N`` non-zeros.
        """
        count = 0
        for entry in self.entries:
            weight = entry.part(entry.weight)
            if entry.keep is not None:
                count += int((weight[~entry.keep] != 0).sum())
            else:
                groups = _group_view(weight, entry.transposed, self.pattern.m)
                count += int(((groups != 0).sum(-1) > self.pattern.n).sum())
        return count

    def __repr__(self) -> str:
        return (f"SparsityMasks({len(self)} weights, pattern={self.pattern}, "
                f"{self.memory_bytes / 2**20:.1f} MiB stored)")
