"""FISTAPruner (arXiv 2408.03728): convex layer-wise pruning with intra-layer error correction.

Each Linear gets the LASSO-type problem ``min ½‖ŴX̂ − WX‖²_F + λ‖Ŵ‖₁`` solved with FISTA
(see ``fista_solver``), ``X`` being its input in the dense layer and ``X̂`` its input once
the operators called before it in the same decoder layer are pruned: q/k/v first, then
o_proj on the pruned attention output, then gate/up, then down. Each operator thus
corrects the error its predecessors left.

How a layer is processed (``finish_layer``), at a cost of a few forward passes:

1. A probe pass on one sample finds the operator groups in call order (operators fed
   the very same tensor, such as q/k/v or gate/up, form one group).
2. With ``error_correction`` (default), for each group in turn and each calibration
   batch: a partial forward of a dense copy of the layer and one of the (partly pruned)
   layer, each stopped as soon as the group's input is known, give ``X`` and ``X̂``; their
   products ``X̂X̂ᵀ`` and ``XX̂ᵀ`` are summed. Then the group is pruned, and the next group
   sees its effect. The first group's input is the layer's (dense) input, so it needs one
   partial pass. Altogether about three layer passes (the partial passes are shorter).
   Without error correction one dense pass collects every group's statistics.
3. Each operator is warm-started (SparseGPT by default, on the error-corrected dense
   weights ``W* = W XX̂ᵀ (X̂X̂ᵀ)⁻¹`` so that its objective is exactly ours), then solved.

With ``layer_inputs="dense"`` (the paper's design) every decoder layer is pruned from the
dense model's hidden states, so layers are independent: ``hf_prune.parallel`` spreads
them over GPUs and torch.distributed ranks. ``layer_inputs="pruned"`` runs in the
sequential engine instead (each layer calibrated on the pruned layers before it).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.utils import logging

from ...config import PruningConfig, check_device
from ...engine.collector import StatisticsCollector
from ...engine.forward import StopForward, UntilStopped
from ...engine.host_memory import heap_for_temporaries
from ...engine.statistics import InputStatistics, StatKind
from ...errors import LambdaSearchError, PruningConfigError, UnsupportedOperatorError
from ...walker.layout import Operator
from ..base import LayerContext, LayerPruner
from ..linalg import damped_cholesky_factors, dead_inputs
from ..patterns import mask_from_scores
from ..sparsegpt import sparsegpt_prune
from .solver import QuadraticProblem, SolverSettings, solve

logger = logging.get_logger(__name__)

WARM_STARTS = ("sparsegpt", "wanda", "magnitude")
SOLVER_DTYPES = {"float32": torch.float32, "float64": torch.float64}
LAYER_INPUTS = ("dense", "pruned")

__all__ = ["FISTAConfig", "FISTAPruner", "LambdaSearchError"]


def _positive_int(value: int, name: str, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if value < low:
        raise PruningConfigError(name, f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class FISTAConfig(PruningConfig):
    """FISTAPruner: per-Linear LASSO solved with FISTA, λ set by bisection, exact final sparsity.

    Args:
        warm_start: ``"sparsegpt"`` (default), ``"wanda"``, ``"magnitude"`` or ``None`` (the
            dense weights, rounded).
        error_correction: solve against ``X̂``, the inputs after the earlier operators of the
            same layer were pruned (intra-layer cumulative error correction). ``False`` uses
            the dense inputs for every operator.
        max_iters: FISTA iterations per λ trial (stopped earlier once converged).
        tol: relative step size below which a row counts as converged.
        error_share: ``ξ``, the share of the final error that the rounding to exact sparsity
            may add; λ is bisected (per row) to reach it. The paper's value is 0.3.
        lambda_steps: bisection steps on ``log λ`` (0 keeps the warm-start mask and only
            re-fits its weights).
        refine_iters: least-squares iterations on the final support.
        strict_lambda: raise ``LambdaSearchError`` when some row's search never brackets
            ``error_share``; by default such rows keep their best rounded candidate (the warm
            start at worst) and the count is logged.
        solver_dtype: ``"float32"`` or ``"float64"``.
        dampening: share of the mean ``X̂X̂ᵀ`` diagonal added to it for the SparseGPT warm
            start and the error-corrected weights (raised tenfold up to three times when
            the matrix is singular).
        ridge: share of the mean diagonal added to ``X̂X̂ᵀ`` inside FISTA, with a matching pull
            towards the dense weights (0 by default: FISTA inverts nothing).
        layer_inputs: ``"dense"`` (each layer pruned from the dense model's hidden states,
            layers independent and parallel) or ``"pruned"`` (sequential, from the pruned
            layers before it).
        devices: devices to spread layers over (``["cuda:0", "cuda:1"]``); default every
            visible GPU when ``device`` is ``"auto"`` and a GPU is present, else ``[device]``.
    """

    method: ClassVar[str] = "fista"
    paper: ClassVar[str] = "https://arxiv.org/abs/2408.03728"

    warm_start: str | None = "sparsegpt"
    error_correction: bool = True
    max_iters: int = 30
    tol: float = 1e-4
    error_share: float = 0.3
    lambda_steps: int = 8
    refine_iters: int = 30
    strict_lambda: bool = False
    solver_dtype: str = "float32"
    dampening: float = 0.01
    ridge: float = 0.0
    layer_inputs: str = "dense"
    devices: list[str] | None = None

    def _normalize_fields(self) -> None:
        super()._normalize_fields()
        if isinstance(self.devices, str):
            self.devices = [self.devices]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warm_start is not None and self.warm_start not in WARM_STARTS:
            raise PruningConfigError("warm_start", f"warm_start must be one of {WARM_STARTS} or None, got "
                                     f"{self.warm_start!r}")
        _positive_int(self.max_iters, "max_iters")
        _positive_int(self.lambda_steps, "lambda_steps", allow_zero=True)
        _positive_int(self.refine_iters, "refine_iters", allow_zero=True)
        if not self.tol > 0:
            raise PruningConfigError("tol", f"tol must be > 0, got {self.tol}")
        if not 0 < self.error_share < 1:
            raise PruningConfigError(
                "error_share", f"error_share must be in (0, 1) (the share of the final error added by rounding; the "
                f"paper uses 0.3), got {self.error_share}"
            )
        if not self.dampening > 0:
            raise PruningConfigError(
                "dampening", f"dampening must be > 0 (a share of the mean Gram diagonal), got {self.dampening}"
            )
        if self.ridge < 0:
            raise PruningConfigError("ridge", f"ridge must be >= 0, got {self.ridge}")
        if self.solver_dtype not in SOLVER_DTYPES:
            raise PruningConfigError("solver_dtype", f"solver_dtype must be one of {sorted(SOLVER_DTYPES)}, got "
                                     f"{self.solver_dtype!r}")
        if self.layer_inputs not in LAYER_INPUTS:
            raise PruningConfigError("layer_inputs", f"layer_inputs must be one of {LAYER_INPUTS}, got "
                                     f"{self.layer_inputs!r}")
        if self.devices is not None:
            if not self.devices or not all(self.devices):
                raise PruningConfigError("devices", f"devices must be a non-empty list of device names such as "
                                         f"'cuda:0', got {self.devices!r}")
            for device in self.devices:
                if device == "auto":
                    raise PruningConfigError("devices", "devices lists real devices such as 'cuda:0'; leave it "
                                             "unset for every visible GPU")
                check_device(device, "devices")
            if self.layer_inputs != "dense":
                raise PruningConfigError("devices", "devices spreads independent layers, which needs "
                                         "layer_inputs='dense'")

    def solver_settings(self) -> SolverSettings:
        return SolverSettings(
            max_iters=self.max_iters, tol=self.tol, error_share=self.error_share, lambda_steps=self.lambda_steps,
            refine_iters=self.refine_iters, ridge=self.ridge, strict=self.strict_lambda,
            dtype=SOLVER_DTYPES[self.solver_dtype],
        )



def _capture_input(layer: nn.Module, module: nn.Module, hidden: torch.Tensor, context: LayerContext,
                   name: str) -> torch.Tensor:
    """The input of ``module`` when ``layer`` runs on ``hidden``; the pass stops right there."""
    box: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple) -> None:
        box.append(inputs[0].detach())
        raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        with UntilStopped(), torch.no_grad():
            layer(hidden, *context.call.args, **context.call.kwargs)
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(
            f"{name} was never called in its layer's forward pass, so it has no calibration inputs; "
            "exclude it with `targets`"
        )
    return box[0]


def operator_groups(layer: nn.Module, targets: list[Operator], context: LayerContext) -> list[list[Operator]]:
    """Targeted operators grouped by shared input tensor, in the order the layer calls them.

    One sample goes through the layer under the engine's statistics collector, whose
    operators share a statistics object exactly when they are fed the same tensor.
    """
    collector = StatisticsCollector(targets, lambda op: StatKind.NORMS, context.device)
    try:
        with torch.no_grad():
            layer(context.inputs[:1], *context.call.args, **context.call.kwargs)
    finally:
        collector.remove()
    missing = [op.name for op in targets if op.name not in collector.stats]
    if missing:
        raise RuntimeError(
            f"targeted operators {missing} were never called in their layer's forward pass, so they have no "
            "calibration inputs; exclude them with `targets`"
        )
    by_name = {op.name: op for op in targets}
    groups: dict[int, list[Operator]] = {}
    for name, stats in collector.stats.items():  # in call order
        groups.setdefault(id(stats), []).append(by_name[name])
    return list(groups.values())


@dataclass
class _GroupStats:
    """Sums over calibration tokens for one group: ``X̂X̂ᵀ``, ``XX̂ᵀ`` (None when X̂ = X), ``‖wX‖²``."""

    gram: torch.Tensor | None
    cross: torch.Tensor | None
    consts: dict[str, torch.Tensor]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float32)


class FISTAPruner(LayerPruner):
    """FISTAPruner: per operator, a LASSO solved by FISTA with the lambda found by bisection.

    Everything happens in :meth:`finish_layer`: the operators are solved in the layer's order
    (q/k/v, o, gate/up, down), each from the inputs it sees once the operators before it are
    pruned (intra-layer error correction). With ``layer_inputs="dense"`` every layer starts
    from the dense model's hidden states, so layers are independent and run in parallel.
    The solver itself is in ``solver``.
    """

    prunes_operators = False

    def __init__(self, config: FISTAConfig) -> None:
        super().__init__(config)
        self.config: FISTAConfig = config
        self.layers_take_dense_inputs = config.layer_inputs == "dense"
        self.worker_devices = config.devices
        self.settings = config.solver_settings()
        self._lock = threading.Lock()
        #: per operator: (warm-start error, final error, ‖WX‖²/2, rows whose λ search did not bracket ξ)
        self.diagnostics: dict[str, tuple[float, float, float, int]] = {}

    def validate(self, op: Operator) -> None:
        super().validate(op)
        if op.expert is not None:
            raise UnsupportedOperatorError(
                f"FISTAPruner cannot prune {op.name}, one expert's slice of a fused expert weight: its dense and "
                "pruned inputs would have to come from the same routed tokens in two passes whose routers may "
                "choose differently. Prune the experts with SparseGPT, Wanda or LLM-Barber (rebuild='swaps'), or "
                "leave them to another run: targets=['*self_attn*', '*shared_expert*'] keeps FISTA off the experts"
            )

    # -- one operator -------------------------------------------------------------------------

    def prune_weight(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float) -> torch.Tensor:
        """Without error correction: one operator from its own dense Gram matrix."""
        if stats is None:
            raise ValueError("FISTAPruner needs calibration statistics for every operator")
        gram = stats.gram.to(weight.device)
        target = weight @ gram
        const = (target * weight).sum(dim=1, dtype=torch.float64)
        return self.solve_operator("operator", weight, gram, None, const, sparsity)

    def solve_operator(self, name: str, weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor | None,
                       const: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Prune one ``(out, in)`` fp32 weight from ``X̂X̂ᵀ``, ``XX̂ᵀ`` (None when equal) and ``‖wX‖²``."""
        target = weight @ (gram if cross is None else cross)
        with heap_for_temporaries():  # the solver's many same-sized temporaries reuse memory
            problem = QuadraticProblem(gram, target, const, self.settings, dense=weight, name=name)
            warm = self.warm_start(weight, gram, target if cross is not None else None, sparsity, name)
            if problem.degenerate:
                logger.warning("%s never sees a non-zero input: its warm start is kept as it is", name)
            result = solve(problem, warm, self.pattern, sparsity, self.settings)
        with self._lock:
            self.diagnostics[name] = (float(result.warm_error.sum()), float(result.error.sum()),
                                      float(const.sum()) / 2, result.unreachable)
        if result.unreachable:
            logger.info("%s: the λ search did not bracket error_share=%g for %d of %d rows; they keep their best "
                        "rounded candidate", name, self.settings.error_share, result.unreachable, weight.shape[0])
        return result.weight

    def warm_start(self, weight: torch.Tensor, gram: torch.Tensor, target: torch.Tensor | None, sparsity: float,
                   name: str) -> torch.Tensor:
        """An exactly sparse starting point. ``target`` (``W XX̂ᵀ``) is given when ``X̂ ≠ X``."""
        kind = self.config.warm_start
        if kind == "sparsegpt":
            dense = weight if target is None else corrected_weights(target, gram, self.config.dampening, name)
            block = self.pattern.m * max(1, 128 // self.pattern.m) if self.pattern.is_nm else 128
            return sparsegpt_prune(dense.clone(), gram, sparsity, self.pattern, block, self.config.dampening)
        if kind == "wanda":
            scores = weight.abs() * torch.diagonal(gram).clamp_min(0).sqrt().unsqueeze(0)
        else:  # magnitude, or None: the dense weights, rounded by magnitude
            scores = weight.abs()
        return weight.masked_fill(mask_from_scores(scores, self.pattern, sparsity), 0.0)

    # -- one layer ----------------------------------------------------------------------------

    def finish_layer(self, context: LayerContext) -> bool:
        if not context.targets:
            return False
        if context.call is None or context.inputs is None:
            raise ValueError("FISTAPruner needs calibration data")
        groups = operator_groups(context.layer, context.targets, context)
        correct = self.config.error_correction and len(groups) > 1
        if context.batch_size >= context.inputs.shape[0]:
            self._one_batch(context, groups, correct)
        elif correct:
            dense_layer = copy.deepcopy(context.layer)
            for index, group in enumerate(groups):
                stats = self._collect(context, dense_layer, group, corrected=index > 0)
                self._prune_group(context, group, stats)
            del dense_layer
        else:
            stats = self._collect_dense(context, groups)
            for group, entry in zip(groups, stats):
                self._prune_group(context, group, entry)
        self._log_layer(context)
        return True

    def _one_batch(self, context: LayerContext, groups: list[list[Operator]], correct: bool) -> None:
        """All samples in one batch: a dense pass, then (with error correction) a pruning pass.

        The dense pass keeps each later group's input ``X`` and sums ``‖wX‖²`` from the
        operators' outputs. In the second pass each group's pre-hook sees ``X̂`` (earlier
        groups already pruned), forms ``X̂X̂ᵀ`` and ``XX̂ᵀ``, and prunes the group before it runs.
        """
        device = context.device
        stats = [_GroupStats(None, None, {}) for _ in groups]
        dense_inputs: dict[int, torch.Tensor] = {}

        def dense_hook(index: int):
            def hook(_module: nn.Module, inputs: tuple) -> None:
                if index in dense_inputs or stats[index].gram is not None:
                    return
                x = _flat(inputs[0])
                if correct and index > 0:  # kept until the pruning pass; a copy, in case a later op works in place
                    dense_inputs[index] = x.clone() if x.data_ptr() == inputs[0].data_ptr() else x
                else:
                    stats[index].gram = x.t() @ x

            return hook

        handles = [group[0].module.register_forward_pre_hook(dense_hook(i)) for i, group in enumerate(groups)]
        for index, group in enumerate(groups):
            for op in group:
                handles.append(op.module.register_forward_hook(_output_norms(op, stats[index].consts, device)))
        try:
            with torch.no_grad():
                context.layer(context.inputs, *context.call.args, **context.call.kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if not correct:
            for group, entry in zip(groups, stats):
                self._prune_group(context, group, entry)
            return
        self._prune_group(context, groups[0], stats[0])

        def pruning_hook(index: int):
            def hook(_module: nn.Module, inputs: tuple) -> None:
                if index not in dense_inputs:
                    return
                x = dense_inputs.pop(index)
                x_hat = _flat(inputs[0])
                stats[index].gram = x_hat.t() @ x_hat
                stats[index].cross = x.t() @ x_hat
                del x
                self._prune_group(context, groups[index], stats[index])
                stats[index] = None
                if not dense_inputs:
                    raise StopForward  # every group is pruned: the rest of the pass is not needed

            return hook

        handles = [group[0].module.register_forward_pre_hook(pruning_hook(i)) for i, group in enumerate(groups)]
        try:
            with UntilStopped(), torch.no_grad():
                context.layer(context.inputs, *context.call.args, **context.call.kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if dense_inputs:
            raise RuntimeError(f"layer {context.index}: some operator groups were not reached in the pruning pass")

    def _collect(self, context: LayerContext, dense_layer: nn.Module, group: list[Operator],
                 corrected: bool) -> _GroupStats:
        """One group's statistics over calibration batches, from partial passes that stop at its input.

        ``X`` comes from ``dense_layer`` (a dense copy), ``X̂`` from the partly pruned layer.
        """
        device = context.device
        width = group[0].in_features
        entry = _GroupStats(torch.zeros(width, width, device=device),
                            torch.zeros(width, width, device=device) if corrected else None,
                            {op.name: torch.zeros(op.out_features, dtype=torch.float64, device=device)
                             for op in group})
        dense_ops = [_dense_operator(op, dense_layer) for op in group]
        weights = [op.read_weight().to(device=device, dtype=torch.float32) for op in dense_ops]
        inputs, size = context.inputs, context.batch_size
        for start in range(0, inputs.shape[0], size):
            batch = inputs[start:start + size]
            x = _flat(_capture_input(dense_layer, dense_ops[0].module, batch, context, group[0].name))
            if corrected:
                x_hat = _flat(_capture_input(context.layer, group[0].module, batch, context, group[0].name))
                entry.gram.addmm_(x_hat.t(), x_hat)
                entry.cross.addmm_(x.t(), x_hat)
            else:
                entry.gram.addmm_(x.t(), x)
            for op, weight in zip(group, weights):
                entry.consts[op.name] += (x @ weight.t()).square().sum(dim=0, dtype=torch.float64)
        return entry

    def _collect_dense(self, context: LayerContext, groups: list[list[Operator]]) -> list[_GroupStats]:
        """Every group's dense statistics, batch by batch, in full passes of the still dense layer."""
        device = context.device
        stats = [_GroupStats(torch.zeros(g[0].in_features, g[0].in_features, device=device), None, {})
                 for g in groups]
        seen: set[int] = set()

        def hook_for(index: int):
            def hook(_module: nn.Module, inputs: tuple) -> None:
                if index not in seen:
                    seen.add(index)
                    x = _flat(inputs[0])
                    stats[index].gram.addmm_(x.t(), x)

            return hook

        handles = [group[0].module.register_forward_pre_hook(hook_for(i)) for i, group in enumerate(groups)]
        for index, group in enumerate(groups):
            for op in group:
                handles.append(op.module.register_forward_hook(_output_norms(op, stats[index].consts, device)))
        try:
            inputs, size = context.inputs, context.batch_size
            for start in range(0, inputs.shape[0], size):
                seen.clear()
                with torch.no_grad():
                    context.layer(inputs[start:start + size], *context.call.args, **context.call.kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return stats

    def _prune_group(self, context: LayerContext, group: list[Operator], stats: _GroupStats) -> None:
        for op in group:
            weight = op.read_weight().to(device=context.device, dtype=torch.float32)
            pruned = self.solve_operator(op.name, weight, stats.gram, stats.cross, stats.consts[op.name],
                                         context.sparsity)
            op.write_weight(pruned)

    def _log_layer(self, context: LayerContext) -> None:
        with self._lock:
            rows = [self.diagnostics[op.name] for op in context.targets if op.name in self.diagnostics]
        if rows:
            warm = sum(r[0] for r in rows) / max(sum(r[2] for r in rows), 1e-30)
            final = sum(r[1] for r in rows) / max(sum(r[2] for r in rows), 1e-30)
            logger.info("layer %d: relative reconstruction error %.4g (warm start %.4g)", context.index, final, warm)


def _output_norms(op: Operator, consts: dict[str, torch.Tensor], device: torch.device):
    """A forward hook summing ``‖wX‖²`` per output row from the operator's own (dense) output."""

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        out = output.detach()
        if getattr(module, "bias", None) is not None:
            out = out - module.bias.detach()
        total = _flat(out).square().sum(dim=0, dtype=torch.float64).to(device)
        consts[op.name] = consts[op.name] + total if op.name in consts else total

    return hook


def _dense_operator(op: Operator, dense_layer: nn.Module | None) -> Operator:
    """``op`` as found in the dense copy of its layer (``op`` itself when there is no copy)."""
    if dense_layer is None:
        return op
    return Operator(op.name, op.local_name, op.layer_index, dense_layer.get_submodule(op.local_name))


def corrected_weights(target: torch.Tensor, gram: torch.Tensor, dampening: float, name: str) -> torch.Tensor:
    """``W* = B (G + δI)⁻¹``: the dense weights that best map ``X̂`` onto ``WX``.

    ``‖ŴX̂ − WX‖² = ‖ŴX̂ − W*X̂‖² + const``, so pruning ``W*`` with SparseGPT on ``G`` minimises
    the error-corrected objective. ``δ`` starts at ``dampening · mean(diag G)`` and grows
    tenfold up to three times while ``G + δI`` is not positive definite.
    """
    dead = dead_inputs(gram)
    for factor in damped_cholesky_factors(gram, dampening, dead):
        solved = torch.cholesky_solve(target.t(), factor).t()
        solved[:, dead] = 0.0
        return solved
    raise ValueError(
        f"the input Gram matrix of {name} cannot be factored even with 1000x dampening (degenerate calibration "
        "inputs?); use warm_start='wanda' or more calibration text"
    )
