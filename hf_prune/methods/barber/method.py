"""LLM-Barber (arXiv 2408.10631): block-aware rebuilding of a sparsity mask, one-shot.

A starting method (magnitude, Wanda or SparseGPT) prunes each decoder layer in the
engine's usual pass, and its mask is then rebuilt: pruned weights grow back and as many
kept weights are dropped, per row (and per N:M group), so the sparsity and the pattern do
not change. Two ways to choose the swaps:

* ``rebuild="swaps"`` (default): right after the starting method prunes an operator, each
  row takes the (grow, drop) pair that lowers its output error on the calibration inputs
  most, computed exactly from the input's Gram matrix, again and again while the error
  falls (``swaps``). The engine walks the operators of a block in order, so each
  one is rebuilt on the inputs left by the rebuilt operators before it.
* ``rebuild="gradient"`` (the paper's): per block of the layer (self-attention, then MLP),
  the block's input in the pruned model goes through the dense and the pruned block; the
  MSE between their outputs is backpropagated to the pruned block's weights, and each
  weight is scored ``|W| * RMS(∇W)`` (root mean square over calibration samples; ``W`` is
  the dense value of a pruned weight, the current one of a kept weight). Pruned weights
  that score high grow back with their dense value, kept weights that score low are
  dropped. This first-order score lowers the block MSE but not the perplexity of a real
  model (measurements in the README), hence the exact swaps by default.

Only the current layer's targeted weights are copied (dense, before pruning); the dense
model is never duplicated. Gradients are taken in float32 whatever the model's dtype.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.utils import logging

from ...config import PruningConfig, short_repr
from ...engine.host_memory import heap_for_temporaries
from ...engine.statistics import InputStatistics, StatKind
from ...errors import PruningConfigError, UnsupportedOperatorError
from ..base import LayerContext, LayerPruner
from ..patterns import Pattern
from ..registry import config_class
from .blocks import Block, block_calls, decoder_blocks, float32_state, run_block
from .swaps import swap_search

logger = logging.get_logger(__name__)

#: Share of the swappable pairs that is swapped, per starting method, as in the paper's scripts.
DEFAULT_THRESHOLDS: dict[str, float] = {"magnitude": 0.1, "wanda": 0.01, "sparsegpt": 0.1}
#: ``rebuild="swaps"``: at most this share of a row's pruned weights grows back.
DEFAULT_SWAP_THRESHOLD = 0.1
GRANULARITIES = ("row", "layer", "block")
REBUILDS = ("swaps", "gradient")
_SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(PruningConfig))


@dataclass
class BarberConfig(PruningConfig):
    """LLM-Barber: rebuild the mask of a starting method with weight x gradient scores.

    Args:
        initial: the method that makes the starting mask: ``"wanda"`` (default), ``"sparsegpt"``,
            ``"magnitude"``, or such a config (to set e.g. SparseGPT's ``block_size``). Its
            sparsity, pattern, targets and calibration come from this config.
        rebuild: how swaps are chosen: ``"swaps"`` (default; exact pair swaps that lower each
            operator's output error, one pair per row at a time, grown weights taking their
            least-squares value) or ``"gradient"`` (the paper's ``|W| * |∇W|`` scores from the
            block's output MSE, grown weights taking their dense value).
        granularity: ``rebuild="gradient"`` only: where grown and dropped weights are paired:
            ``"row"`` (within each output row, and within each group of M for N:M; keeps every
            row's sparsity), ``"layer"`` (within each Linear) or ``"block"`` (across all Linears
            of the attention or MLP block). Only ``"row"`` keeps an N:M pattern. The exact swaps
            always pair within rows.
        threshold: in [0, 1]. ``rebuild="swaps"``: the largest share of a row's pruned weights
            that may grow back (default 0.1); ``"gradient"``: the share of the swappable pairs
            (those where the grown weight outscores the dropped one) that is swapped (default
            per starting method, as in the paper: 0.01 for Wanda, 0.1 for SparseGPT and
            magnitude). 0 keeps the starting mask.
        keep_initial_updates: keep the starting method's updated weights (SparseGPT) on the
            weights that stay; ``False`` re-applies the rebuilt mask to the dense weights.
            Grown weights get their dense value (``"gradient"``) or their least-squares value
            (``"swaps"``).
        grad_batch_size: ``rebuild="gradient"`` only: calibration samples per backward pass.
            Gradients are averaged as a root mean square over these batches; 1 (per sample, as
            in the paper) is the most faithful, larger is faster on a GPU and uses more memory.
    """

    method: ClassVar[str] = "barber"
    paper: ClassVar[str] = "https://arxiv.org/abs/2408.10631"

    initial: PruningConfig | str | dict | None = None
    rebuild: str = "swaps"
    granularity: str = "row"
    threshold: float | None = None
    keep_initial_updates: bool = True
    grad_batch_size: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.initial = self._resolve_initial(self.initial)
        if self.rebuild not in REBUILDS:
            raise PruningConfigError("rebuild", f"rebuild must be one of {REBUILDS}, got {self.rebuild!r}")
        if self.granularity not in GRANULARITIES:
            raise PruningConfigError("granularity", f"granularity must be one of {GRANULARITIES}, got "
                                     f"{self.granularity!r}")
        if self.rebuild == "swaps" and self.granularity != "row":
            raise PruningConfigError(
                "granularity", f"granularity={self.granularity!r} applies to rebuild='gradient'; the exact swaps "
                "pair weights within rows: use granularity='row' or rebuild='gradient'"
            )
        if self.parsed_pattern.is_nm and self.granularity != "row":
            raise PruningConfigError(
                "granularity", f"granularity={self.granularity!r} moves weights between rows and N:M groups, which "
                f"breaks the {self.pattern} pattern: use granularity='row' with an N:M pattern"
            )
        if self.threshold is None:
            swaps = self.rebuild == "swaps"
            self.threshold = DEFAULT_SWAP_THRESHOLD if swaps else DEFAULT_THRESHOLDS[self.initial.method]
        if not 0.0 <= self.threshold <= 1.0:
            raise PruningConfigError(
                "threshold", f"threshold must be a share in [0, 1] of the swappable weight pairs, got "
                f"{self.threshold!r}; the paper uses {DEFAULT_THRESHOLDS}"
            )
        self.threshold = float(self.threshold)
        if self.grad_batch_size < 1:
            raise PruningConfigError("grad_batch_size", f"grad_batch_size must be a positive integer, got "
                                     f"{self.grad_batch_size!r}")

    @staticmethod
    def _check_initial_name(name: object) -> None:
        """Refuse a starting method other than Wanda, SparseGPT or magnitude (before building its config,
        so a record nesting Barber configs inside ``initial`` is refused at the first level)."""
        if not isinstance(name, str) or name not in DEFAULT_THRESHOLDS:
            raise PruningConfigError(
                "initial", f"initial={short_repr(name)} is not a starting method for LLM-Barber: initial must be "
                f"one of {sorted(DEFAULT_THRESHOLDS)} (a name or its config)"
            )

    def _resolve_initial(self, initial: Any) -> PruningConfig:
        """The starting method's config, with this config's shared fields."""
        if initial is None:
            initial = "wanda"
        if isinstance(initial, str):
            self._check_initial_name(initial)
            return config_class(initial)(**self._shared())
        if isinstance(initial, dict):
            self._check_initial_name(initial.get("method"))
            initial = PruningConfig.from_dict(initial)
        if not isinstance(initial, PruningConfig):
            raise PruningConfigError("initial", f"initial must be one of {sorted(DEFAULT_THRESHOLDS)} (a name or "
                                     f"its config), got {short_repr(initial)}")
        self._check_initial_name(initial.method)
        defaults = PruningConfig.__dataclass_fields__
        for name, value in self._shared().items():
            mine, default = getattr(initial, name), defaults[name].default
            if name != "owl" and mine != value and mine != default:
                raise PruningConfigError(
                    f"initial.{name}", f"initial.{name}={short_repr(mine)} differs from this config's "
                    f"{name}={short_repr(value)}: set {name} on BarberConfig only (it applies to the starting method "
                    "too)"
                )
        return dataclasses.replace(initial, **self._shared())

    def _shared(self) -> dict[str, Any]:
        shared = {name: getattr(self, name) for name in _SHARED_FIELDS}
        shared["targets"] = list(self.targets) if self.targets is not None else None
        shared["owl"] = None  # the engine applies OWL from this config; the starting method never sees it
        return shared

    @classmethod
    def _decode_fields(cls, kwargs: dict[str, Any]) -> PruningConfig:
        if isinstance(kwargs.get("initial"), dict):
            cls._check_initial_name(kwargs["initial"].get("method"))
            kwargs = {**kwargs, "initial": PruningConfig.from_dict(kwargs["initial"])}
        return cls(**kwargs)


def _swap_in_groups(scores: torch.Tensor, pruned: torch.Tensor, threshold: float) -> torch.Tensor:
    """Rebuilt mask for ``[rows, groups, size]`` scores; swaps pair entries of the same group.

    In each group, the best pruned entries are paired with the worst kept ones, in order.
    A row's swappable pairs are those whose grown score beats the dropped one;
    ``floor(threshold * count)`` of them, the largest gains first, are swapped.
    """
    grow_scores, grow_index = scores.masked_fill(~pruned, -math.inf).sort(dim=-1, descending=True)
    drop_scores, drop_index = scores.masked_fill(pruned, math.inf).sort(dim=-1)
    gain = grow_scores - drop_scores  # -inf where a group runs out of pruned or kept entries
    rows = gain.shape[0]
    flat = gain.reshape(rows, -1)
    swaps = torch.floor((flat > 0).sum(dim=1) * threshold).long()
    order = flat.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    chosen = (rank < swaps.unsqueeze(1)).reshape(gain.shape)
    grow = torch.zeros_like(pruned).scatter_(-1, grow_index, chosen)
    drop = torch.zeros_like(pruned).scatter_(-1, drop_index, chosen)
    return (pruned & ~grow) | drop


def rebuild_masks(scores: list[torch.Tensor], masks: list[torch.Tensor], granularity: str, pattern: Pattern,
                  threshold: float) -> list[torch.Tensor]:
    """Swap pruned and kept entries of ``masks`` (``True`` = pruned) by ``scores`` (high = important).

    Equal numbers are grown and dropped per row (and per N:M group) for ``"row"``, per
    weight for ``"layer"``, over all the weights together for ``"block"``.
    """
    if granularity == "row":
        out = []
        for score, mask in zip(scores, masks):
            rows, cols = score.shape
            size = pattern.m if pattern.is_nm else cols
            shape = (rows, cols // size, size)
            out.append(_swap_in_groups(score.reshape(shape), mask.reshape(shape), threshold).reshape(rows, cols))
        return out
    if granularity == "layer":
        return [
            _swap_in_groups(score.reshape(1, 1, -1), mask.reshape(1, 1, -1), threshold).reshape(mask.shape)
            for score, mask in zip(scores, masks)
        ]
    if granularity == "block":
        flat = _swap_in_groups(torch.cat([s.reshape(-1) for s in scores]).reshape(1, 1, -1),
                               torch.cat([m.reshape(-1) for m in masks]).reshape(1, 1, -1), threshold).reshape(-1)
        return [part.reshape(m.shape) for part, m in zip(flat.split([m.numel() for m in masks]), masks)]
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


@dataclass
class BlockRebuild:
    """What rebuilding one block did: swapped weights and its output MSE on calibration data.

    With ``rebuild="swaps"`` the MSEs are measured only when asked (``measure_after``);
    "before" is then the block with the starting method's weights.
    """

    layer: int
    block: str
    swapped: int
    weights: int
    mse_before: float | None = None
    mse_after: float | None = None


class BarberPruner(LayerPruner):
    """The starting method prunes each operator in the engine's pass; the masks are rebuilt right after
    (``rebuild="swaps"``, in ``prune_operator``) or per block in ``finish_layer`` (``"gradient"``).

    ``measure_after`` also measures each block's output MSE after rebuilding (and, for the swaps,
    before: one more pass of the dense and pruned block each); ``rebuilds`` keeps one
    ``BlockRebuild`` per block.
    """

    def __init__(self, config: BarberConfig, measure_after: bool = False) -> None:
        super().__init__(config)
        self.initial = config.initial.make_pruner()
        self.measure_after = measure_after
        self.rebuilds: list[BlockRebuild] = []
        self._dense: dict[str, torch.Tensor] = {}
        self._started: dict[str, torch.Tensor] = {}  # swaps + measure_after: the starting method's weights
        self._swapped: dict[str, int] = {}  # swaps: weights grown back, per operator of the current layer

    @property
    def _swaps(self) -> bool:
        return self.config.rebuild == "swaps"  # type: ignore[attr-defined]

    def statistics_kind(self, op) -> StatKind:
        return StatKind.GRAM if self._swaps else self.initial.statistics_kind(op)

    def validate(self, op) -> None:
        self.initial.validate(op)
        if op.expert is not None and not self._swaps:
            raise UnsupportedOperatorError(
                f"LLM-Barber with rebuild='gradient' cannot prune {op.name}, one expert's slice of a fused expert "
                "weight: its block gradients need a dense MLP block. Use rebuild='swaps' (the default), which "
                "rebuilds each expert on its own routed tokens, or leave the experts out with `targets`"
            )

    def prune_operator(self, op, weight: torch.Tensor, stats: InputStatistics | None,
                       sparsity: float) -> torch.Tensor:
        if not self._swaps:
            return self.initial.prune_operator(op, weight, stats, sparsity)
        config: BarberConfig = self.config  # type: ignore[assignment]
        dense = weight.clone()
        start = self.initial.prune_operator(op, weight, stats, sparsity)
        if not config.keep_initial_updates:
            start = dense.masked_fill(start == 0, 0.0)
        if self.measure_after:
            self._started[op.name] = start.clone()
        most_pruned = int((start == 0).sum(dim=1).max()) if start.numel() else 0
        limit = math.floor(config.threshold * most_pruned)
        if limit == 0 or stats is None:
            self._swapped[op.name] = 0
            return start
        group = self.pattern.m if self.pattern.is_nm else None
        with heap_for_temporaries():
            outcome = swap_search(start, dense, stats.gram, group, limit)
        self._swapped[op.name] = outcome.grown
        logger.debug("%s: %d swaps, output error %.4g -> %.4g", op.name, outcome.swaps, outcome.error_before,
                     outcome.error_after)
        return outcome.weight

    def prune_weight(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float) -> torch.Tensor:
        return self.initial.prune_weight(weight, stats, sparsity)

    def start_layer(self, context: LayerContext) -> None:
        self.initial.start_layer(context)
        if not self._swaps or self.measure_after:
            self._dense = {op.name: op.read_weight().detach().clone() for op in context.targets}

    def finish_layer(self, context: LayerContext) -> bool:
        changed = self.initial.finish_layer(context)
        try:
            for block in decoder_blocks(context.layout, context.index, context.targets, allow_stray=self._swaps):
                if self._swaps:
                    self._record_swaps(context, block)
                else:
                    changed |= self._rebuild_block(context, block)
        finally:
            self._dense, self._started, self._swapped = {}, {}, {}
        return changed

    def _record_swaps(self, context: LayerContext, block: Block) -> None:
        """The ``BlockRebuild`` of a block whose operators the exact swaps already rebuilt."""
        record = BlockRebuild(context.index, block.name, sum(self._swapped.get(op.name, 0) for op in block.operators),
                              sum(op.in_features * op.out_features for op in block.operators))
        if self.measure_after and block.module is not None:  # "other": experts, MLA, mixers: no block to run
            state = float32_state(block.module)
            dense = {op.name: self._dense[op.name].to(torch.float32) for op in block.operators}
            started = {op.name: self._started[op.name] for op in block.operators}
            record.mse_before = self._block_error(context, block, state, dense, started)
            record.mse_after = self._block_error(context, block, state, dense)
        self.rebuilds.append(record)
        self._log(record)

    def _log(self, record: BlockRebuild) -> None:
        logger.info(
            "layer %d %s: swapped %d of %d weights%s", record.layer, record.block, record.swapped, record.weights,
            "" if record.mse_before is None else f" (block output MSE before {record.mse_before:.4g}"
            + ("" if record.mse_after is None else f", after {record.mse_after:.4g}") + ")",
        )

    def _calls(self, context: LayerContext, block: Block):
        chunk = self.config.grad_batch_size
        for call in block_calls(context.layer, block, context.inputs, context.call, chunk):
            yield call.float32()

    def _gradient_pass(self, context: LayerContext, block: Block, state: dict[str, torch.Tensor],
                       dense: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> tuple[float, dict]:
        """Block output MSE at ``weights`` and the root mean square of its gradient over calibration batches."""
        config: BarberConfig = self.config  # type: ignore[assignment]
        names = [op.name for op in block.operators]
        leaves = {name: weights[name].clone().requires_grad_(True) for name in names}
        square_sum = {name: torch.zeros_like(weights[name]) for name in names}
        error, samples, batches = 0.0, 0, 0
        total = context.inputs.shape[0]
        for call in logging.tqdm(self._calls(context, block), desc=f"LLM-Barber {block.name}", unit="batch",
                                 leave=False, total=math.ceil(total / config.grad_batch_size)):
            with torch.no_grad():
                target = run_block(block, state, dense, call)
            with torch.enable_grad():
                out = run_block(block, state, leaves, call)
                loss = (out - target).square().mean()
                grads = torch.autograd.grad(loss, [leaves[n] for n in names])
            for name, grad in zip(names, grads):
                square_sum[name].addcmul_(grad, grad)
            error += float(loss.detach()) * call.samples
            samples += call.samples
            batches += 1
            del out, loss, grads
        rms = {n: (square_sum[n] / max(batches, 1)).sqrt() for n in names}
        return error / max(samples, 1), rms

    def _rebuild_block(self, context: LayerContext, block: Block) -> bool:
        config: BarberConfig = self.config  # type: ignore[assignment]
        ops = block.operators
        dense = {op.name: self._dense[op.name].to(torch.float32) for op in ops}
        masks = {op.name: op.read_weight() == 0 for op in ops}
        if config.keep_initial_updates:
            start = {op.name: op.read_weight().to(torch.float32, copy=True) for op in ops}
        else:
            start = {name: dense[name].masked_fill(masks[name], 0.0) for name in dense}
        state = float32_state(block.module)
        error, rms = self._gradient_pass(context, block, state, dense, start)
        names = [op.name for op in ops]
        # |W|: the dense value where pruned (what growing restores), the current value where kept
        values = {name: torch.where(masks[name], dense[name], start[name]) for name in names}
        scores = [values[name].abs() * rms[name] for name in names]
        del rms
        new_masks = rebuild_masks(scores, [masks[name] for name in names], config.granularity, self.pattern,
                                  config.threshold)
        swapped = sum(int((new & ~masks[name]).sum()) for name, new in zip(names, new_masks))
        changed = swapped > 0 or not config.keep_initial_updates
        if changed:
            for op, new in zip(ops, new_masks):
                op.write_weight(values[op.name].masked_fill_(new, 0.0))
        record = BlockRebuild(context.index, block.name, swapped, sum(m.numel() for m in new_masks), error)
        if self.measure_after:
            record.mse_after = self._block_error(context, block, state, dense)
        self.rebuilds.append(record)
        self._log(record)
        return changed

    def _block_error(self, context: LayerContext, block: Block, state: dict[str, torch.Tensor],
                     dense: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None = None) -> float:
        """Mean squared difference between the dense block's outputs and the block's with ``weights``
        (default: the current ones) on the pruned block's input."""
        current = weights or {op.name: op.read_weight().to(torch.float32) for op in block.operators}
        total, samples = 0.0, 0
        with torch.no_grad():
            for call in self._calls(context, block):
                diff = run_block(block, state, current, call) - run_block(block, state, dense, call)
                total += float(diff.square().mean()) * call.samples
                samples += call.samples
        return total / max(samples, 1)
