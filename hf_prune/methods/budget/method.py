"""A parameter budget: search the mix of depth, heads, hidden size, experts and neurons that reaches it best.

As in Minitron's search mode (Muralidharan et al., arXiv 2407.14679), a handful of candidate
architectures that all keep the asked number of parameters are pruned from the dense model and
compared, here by the KL divergence of their next-token distributions from the dense model's on
held-out calibration windows; the best is kept.

A candidate is a *mix*: the shares of the parameters to remove spent on decoder layers
(``DepthConfig``), attention KV groups and residual channels (``HiddenSizeConfig``), and in a
mixture of experts routed experts (``ExpertPruningConfig``), each in whole units; the MLP
neurons (``neuron_method``, a structured method; in a mixture of experts the neurons of every
routed expert) take the rest, their
count solved on exact counts of a weightless copy (``plan``) so that the kept non-embedding
parameters land on the target within one rounding unit: the parameters of ``round_to`` neurons in
every kept layer. Every candidate is pruned on a copy of the model (one copy at a time beside the
dense model) from the same calibration windows, scored, and dropped; the chosen one is then pruned
again into the model itself, stage by stage (depth, experts, then neurons and heads, then hidden size), so
the result is the candidate that was scored.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.utils import logging

from ...config import PruningConfig
from ...data.calibration import CalibrationSet
from ...engine.loop import prune_model
from ...engine.offload import is_offloaded
from ...engine.statistics import InputStatistics, StatKind
from ...errors import HfPruneError, PruningConfigError, UnsupportedArchitectureError
from ...training.distillation import evaluate_kl
from ...walker.layout import DecoderLayout, Operator
from ..base import LayerPruner, ModelContext
from ..depth import SCORES, DepthConfig
from ..experts import ExpertPruningConfig
from ..hidden_size import HiddenSizeConfig
from ..registry import METHODS, config_class, pruner_class
from ..structured.base import StructuredConfig
from .plan import MIX_AXES, BudgetPlanner, Candidate, Shape, full_mix, model_copy, non_embedding_parameters

logger = logging.get_logger(__name__)

#: key of the pruning record entry describing the search
RECORD_KEY = "budget_search"
DEFAULT_AMOUNT = 0.25
#: the mixes tried by default: shares of the removal spent on (depth, heads, hidden size); MLP neurons the rest
DEFAULT_MIXES = ((0.0, 0.0, 0.0), (0.5, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.5, 0.0), (0.0, 0.0, 0.5),
                 (0.25, 0.25, 0.25))
#: the mixes tried by default on a mixture of experts, whose heads stay: shares spent on (depth, heads, hidden
#: size, routed experts); the routed experts' neurons the rest
DEFAULT_EXPERT_MIXES = ((0.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, 0.0), (0.0, 0.0, 0.5, 0.0), (0.0, 0.0, 0.0, 0.5),
                        (0.0, 0.0, 0.0, 1.0), (0.25, 0.0, 0.0, 0.5))
MAX_MIXES = 64


@dataclass
class BudgetConfig(PruningConfig):
    """Reach a parameter budget with the mix of depth, heads, hidden size and MLP neurons that loses least.

    Args:
        target_params: the non-embedding parameters to keep: an integer is a count, a float in (0, 1) a share
            of the dense model's. Non-embedding parameters are every parameter but the token (and position)
            embeddings and the LM head, tied weights counted once. A float of 1 or more is refused (a count is
            an integer: pass 50000000, not 5e7); so are 0, negative values and booleans. Give either
            ``target_params`` or ``amount``.
        amount: the share of the non-embedding parameters removed, in [0, 1): ``target_params = 1 - amount``.
            Default 0.25 when neither is given; ``sparsity`` mirrors it (for a count, 0; for a share, 1 - share).
        mixes: the candidates tried, each ``[depth, heads, hidden]`` or ``[depth, heads, hidden, experts]``: the
            shares (in [0, 1], summing to at most 1) of the parameters to remove spent on decoder layers, attention
            KV groups, residual channels and (mixtures of experts only) the routed experts of every MoE layer, each
            in the whole units nearest its share (all rounded down when that would remove more than the budget);
            the MLP neurons (in a mixture of experts, every routed expert's) remove the rest. Default: neurons only,
            half and all of it on depth, half on heads, half on hidden size, a quarter on each; on a mixture of
            experts (whose heads stay) neurons only, half on depth, half on hidden size, half and all on experts, a
            quarter on depth with half on experts.
        neuron_method: the structured method that removes MLP neurons and KV groups (any registered
            ``StructuredConfig``: ``"activation-norm-structured"`` (default), ``"llm-rank"``,
            ``"l1-norm-structured"``, ``"mutual-info"``; on a mixture of experts one that scores expert neurons:
            ``"activation-norm-structured"`` or ``"l1-norm-structured"``). Routed experts are chosen by
            ``ExpertPruningConfig``'s REAP score.
        depth_score: how ``DepthConfig`` chooses the decoder layers (default ``"block-influence"``).
        round_to: kept MLP neurons and hidden channels are multiples of this (default 8); the kept parameter
            count is then within one rounding unit (``round_to`` neurons in every kept layer) of the target.
        score_samples: calibration windows held out to score the candidates (the last ones; the others prune).
            Default: a quarter of the windows (at least one).

    The candidates, the mix each became, its kept parameters and its KL to the dense model are logged as a
    table and kept in the pruning record (``pruning_config.budget_search``); hidden-size pruning adds its
    ``removed_channels`` entry. When every layer keeps the same sizes (the default mixes), the saved config
    states them, so plain transformers loads the checkpoint.
    """

    method: ClassVar[str] = "budget"
    paper: ClassVar[str] = "https://arxiv.org/abs/2407.14679"

    sparsity: float | None = None
    target_params: int | float | None = None
    amount: float | None = None
    mixes: list[list[float]] | None = None
    neuron_method: str = "activation-norm-structured"
    depth_score: str = "block-influence"
    round_to: int = 8
    score_samples: int | None = None

    def __post_init__(self) -> None:
        self._check_types()
        self._check_target()
        if self.pattern != "unstructured":
            raise PruningConfigError("pattern", f"pattern={self.pattern!r} does not apply to a parameter budget, "
                                     "which removes whole layers, heads, neurons and channels; prune again afterwards "
                                     "with e.g. WandaConfig(pattern='2:4')")
        super().__post_init__()
        if self.targets is not None:
            raise PruningConfigError("targets", "a parameter budget is spent over the whole model; leave targets "
                                     "unset")
        if self.owl is not None:
            raise PruningConfigError("owl", "owl sets unstructured per-layer sparsities and does not apply to a "
                                     "parameter budget")
        if self.round_to < 1:
            raise PruningConfigError("round_to", f"round_to must be a positive integer, got {self.round_to!r}")
        if self.depth_score not in SCORES:
            raise PruningConfigError("depth_score", f"depth_score must be one of {', '.join(SCORES)}, got "
                                     f"{self.depth_score!r}")
        structured = sorted(name for name in METHODS if issubclass(config_class(name), StructuredConfig))
        if self.neuron_method not in structured:
            raise PruningConfigError("neuron_method", f"neuron_method must be a structured method "
                                     f"({', '.join(structured)}), got {self.neuron_method!r}")
        if self.score_samples is not None and not 1 <= self.score_samples < self.num_samples:
            raise PruningConfigError("score_samples", f"score_samples must be at least 1 and below num_samples="
                                     f"{self.num_samples} (the other windows prune), got {self.score_samples!r}")
        self._check_mixes()

    def _check_target(self) -> None:
        """Settle ``target_params`` against ``amount`` and ``sparsity`` (which mirrors the share removed)."""
        target = self.target_params
        if target is not None:
            if isinstance(target, float):
                if target >= 1:
                    hint = f"{int(target)}" if target.is_integer() and target > 1 else "an integer count"
                    raise PruningConfigError(
                        "target_params", f"target_params={target!r} is ambiguous: a float is a share of the "
                        f"non-embedding parameters kept and must lie in (0, 1); a count is an integer: pass {hint}, "
                        "or a share such as 0.7")
                if not target > 0:
                    raise PruningConfigError("target_params", f"target_params must be a positive integer count or a "
                                             f"share in (0, 1) of the non-embedding parameters kept, got {target!r}")
            elif target < 1:
                raise PruningConfigError("target_params", f"target_params must be a positive integer count or a "
                                         f"share in (0, 1) of the non-embedding parameters kept, got {target!r}")
            if self.amount is not None:
                raise PruningConfigError("amount", "pass either target_params (what is kept) or amount (the share "
                                         "removed), not both")
            mirrored = 1.0 - target if isinstance(target, float) else 0.0
            if self.sparsity is not None and not math.isclose(self.sparsity, mirrored, abs_tol=1e-9):
                raise PruningConfigError("sparsity", f"sparsity={self.sparsity} contradicts target_params={target!r}; "
                                         "pass only target_params")
            self.sparsity = mirrored
            return
        self._settle_amount("the non-embedding parameters", DEFAULT_AMOUNT)

    def _check_mixes(self) -> None:
        if self.mixes is None:
            return
        if not self.mixes or len(self.mixes) > MAX_MIXES:
            raise PruningConfigError("mixes", f"mixes must list 1 to {MAX_MIXES} candidates, got {len(self.mixes)}")
        for i, mix in enumerate(self.mixes):
            if len(mix) not in (len(MIX_AXES) - 1, len(MIX_AXES)) or not all(0 <= s <= 1 for s in mix) or (
                    sum(mix) > 1 + 1e-9):
                raise PruningConfigError(
                    "mixes", f"mixes[{i}]={mix!r}: each mix is [depth, heads, hidden] or [depth, heads, hidden, "
                    "experts], shares in [0, 1] of the parameters removed that sum to at most 1 (the MLP neurons "
                    "remove the rest), e.g. [0.5, 0, 0.25] or, for a mixture of experts, [0.25, 0, 0, 0.5]")

    def candidate_mixes(self, experts: bool = False) -> list[tuple[float, ...]]:
        """The mixes tried, each with a share for every axis: ``mixes``, or the defaults of a dense model
        (``DEFAULT_MIXES``) or, with ``experts``, of a mixture of experts (``DEFAULT_EXPERT_MIXES``)."""
        return [full_mix(mix) for mix in (self.mixes or (DEFAULT_EXPERT_MIXES if experts else DEFAULT_MIXES))]

    def kept_target(self, dense: int) -> int:
        """The non-embedding parameters to keep out of the dense model's ``dense``."""
        if self.target_params is None:
            return round((1.0 - self.amount) * dense)
        if isinstance(self.target_params, float):
            return round(self.target_params * dense)
        return int(self.target_params)

    def held_out(self, windows: int) -> int:
        """How many of ``windows`` calibration windows score the candidates (the last ones)."""
        if windows < 2:
            raise PruningConfigError("num_samples", f"a parameter budget needs at least 2 calibration windows (some "
                                     f"prune, the others score the candidates), got {windows}")
        count = self.score_samples if self.score_samples is not None else max(1, windows // 4)
        if count >= windows:
            raise PruningConfigError("score_samples", f"score_samples={count} leaves none of the {windows} "
                                     "calibration windows to prune with; lower it or raise num_samples")
        return count


class BudgetPruner(LayerPruner):
    """Does nothing per layer; in ``finish_model`` searches the candidates on copies, then prunes the best one
    into the model."""

    prunes_operators = False

    def __init__(self, config: BudgetConfig) -> None:
        super().__init__(config)
        self.config: BudgetConfig = config
        #: the candidates of the last search, in the order tried, and the index of the chosen one
        self.candidates: list[Candidate] = []
        self.chosen: int | None = None

    def statistics_kind(self, op: Operator) -> StatKind:
        return StatKind.NONE

    def validate(self, op: Operator) -> None:
        return None

    def prune_weight(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float) -> torch.Tensor:
        raise TypeError("a parameter budget prunes whole layers, heads, neurons and channels in finish_model")

    def planner(self, model: torch.nn.Module) -> BudgetPlanner:
        """The planner of ``model`` for this budget (raises ``PruningConfigError`` for a target out of reach)."""
        dense = non_embedding_parameters(model)
        target = self.config.kept_target(dense)
        field = "target_params" if self.config.target_params is not None else "amount"
        if target >= dense:
            raise PruningConfigError(field, f"{field}={getattr(self.config, field)!r} keeps {target:,} of the model's "
                                     f"{dense:,} non-embedding parameters: nothing to remove; ask for fewer")
        if target < 1:
            raise PruningConfigError(field, f"{field}={getattr(self.config, field)!r} keeps no parameter of the "
                                     f"model's {dense:,} non-embedding parameters; ask for more")
        planner = BudgetPlanner(model, target, self.config.round_to)
        if planner.experts and not pruner_class(self.config.neuron_method).scores_expert_neurons:
            raise PruningConfigError("neuron_method", f"neuron_method={self.config.neuron_method!r} has no rule for "
                                     "the neurons of routed experts; on a mixture of experts use "
                                     "'activation-norm-structured' or 'l1-norm-structured'")
        return planner

    def validate_layout(self, layout: DecoderLayout) -> None:
        model = layout.model
        if is_offloaded(model) or len(set((getattr(model, "hf_device_map", None) or {"": 0}).values())) > 1:
            raise UnsupportedArchitectureError("a parameter budget prunes copies of the whole model, which "
                                               "accelerate's placement (device_map) holds; load the model without "
                                               "device_map")
        self.planner(model)

    # the stages one candidate is pruned with -------------------------------------------------------------------
    def stage_configs(self, shape: Shape, samples: int, seq_len: int) -> list[PruningConfig]:
        """The pruning configs that give ``shape``, in the order they run: depth, routed experts, neurons and heads,
        hidden size."""
        c = self.config
        common: dict[str, Any] = dict(calibration=c.calibration, num_samples=samples, seq_len=seq_len, seed=c.seed,
                                      device=c.device, batch_size=c.batch_size if c.batch_size and c.batch_size <
                                      samples else None)
        stages: list[PruningConfig] = []
        if shape.layers_removed:
            stages.append(DepthConfig(num_layers=shape.layers_removed, score=c.depth_score, **common))
        if shape.experts_kept is not None:
            stages.append(ExpertPruningConfig(num_experts_to_keep=shape.experts_kept, **common))
        if shape.neuron_amount > 0 or shape.head_amount > 0:
            stages.append(config_class(c.neuron_method)(
                amount=shape.neuron_amount, heads=shape.head_amount > 0,
                head_amount=shape.head_amount if shape.head_amount > 0 else None, round_to=c.round_to, **common))
        if shape.hidden_size is not None:
            stages.append(HiddenSizeConfig(hidden_size=shape.hidden_size, round_to=c.round_to, **common))
        return stages

    def apply(self, model: torch.nn.Module, shape: Shape, calibration: CalibrationSet) -> dict:
        """Prune ``model`` in place to ``shape``; returns the record entries the stages wrote."""
        entries: dict = {}
        samples, seq_len = calibration.input_ids.shape
        for config in self.stage_configs(shape, samples, seq_len):
            run = prune_model(model, config, calibration)
            entries.update(run.record_entries or {})
        return entries

    # the search ---------------------------------------------------------------------------------------------------
    def finish_model(self, context: ModelContext) -> None:
        if context.input_ids is None:
            raise ValueError("a parameter budget needs calibration data: candidates are pruned and scored on it")
        model = context.layout.model
        planner = self.planner(model)
        windows = context.input_ids.shape[0]
        held = self.config.held_out(windows)
        calibration = CalibrationSet(context.input_ids[:windows - held], {})
        scoring = context.input_ids[windows - held:]
        self.candidates = self._search(model, planner, calibration, scoring, context.batch_size)
        scored = [i for i, c in enumerate(self.candidates) if c.kl is not None and c.same_as is None]
        if not scored:
            reasons = "; ".join(f"{c.mix}: {c.skipped}" for c in self.candidates)
            raise PruningConfigError("target_params" if self.config.target_params is not None else "amount",
                                     f"no candidate mix reaches {planner.target:,} of {planner.dense:,} non-embedding "
                                     f"parameters ({reasons}); ask for another target or other mixes")
        self.chosen = min(scored, key=lambda i: (self.candidates[i].kl, i))
        best = self.candidates[self.chosen]
        unit = planner.rounding_unit(best.shape)
        self._log_table(planner, unit)
        entries = self.apply(model, best.shape, calibration)
        kept = non_embedding_parameters(model)
        if kept != best.parameters:
            logger.warning("the pruned model keeps %d non-embedding parameters, the search counted %d", kept,
                           best.parameters)
        self.record_entries.update(entries)
        self.record_entries[RECORD_KEY] = {
            "target_params": planner.target, "dense_params": planner.dense, "kept_params": kept,
            "rounding_unit": unit, "scored_windows": held, "chosen": self.chosen,
            "mixture_of_experts": bool(planner.experts),
            "candidates": [c.to_dict() for c in self.candidates],
        }

    def _search(self, model: torch.nn.Module, planner: BudgetPlanner, calibration: CalibrationSet,
                scoring: torch.Tensor, batch_size: int) -> list[Candidate]:
        candidates = [planner.candidate(mix) for mix in self.config.candidate_mixes(bool(planner.experts))]
        seen: dict[tuple, int] = {}
        for index, candidate in enumerate(logging.tqdm(candidates, desc="Budget search", unit="candidate")):
            if candidate.skipped is not None:
                continue
            key = (candidate.layers_removed, candidate.kv_groups_removed, candidate.hidden_size,
                   candidate.experts_removed, candidate.mlp_neurons)
            if key in seen:
                first = candidates[seen[key]]
                candidate.same_as, candidate.kl, candidate.skipped = seen[key], first.kl, first.skipped
                continue
            seen[key] = index
            copy = model_copy(model)  # the only candidate alive beside the dense model
            try:
                self.apply(copy, candidate.shape, calibration)
                candidate.parameters = non_embedding_parameters(copy)
                candidate.kl = evaluate_kl(copy, model, scoring, batch_size=batch_size)
            except (HfPruneError, ValueError) as err:
                candidate.skipped = f"{type(err).__name__}: {err}"
            finally:
                del copy
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return candidates

    def _log_table(self, planner: BudgetPlanner, unit: int) -> None:
        lines = [f"budget search: keep {planner.target:,} of {planner.dense:,} non-embedding parameters "
                 f"(rounding unit {unit:,}); {len(self.candidates)} mixes of [depth, heads, hidden, experts] shares, "
                 f"{'routed-expert' if planner.experts else 'MLP'} neurons the rest",
                 f"{'#':>3} {'mix':>24} {'layers-':>7} {'kv-':>4} {'hidden':>6} {'experts-':>8} {'neurons':>7} "
                 f"{'params':>12} {'KL':>10}"]
        for i, c in enumerate(self.candidates):
            mix = "[" + ", ".join(f"{s:.2f}" for s in c.mix) + "]"
            mark = " <- chosen" if i == self.chosen else ""
            if c.shape is None:
                lines.append(f"{i:>3} {mix:>24} skipped: {c.skipped}")
                continue
            kl = "-" if c.kl is None else f"{c.kl:.6f}"
            note = f" (same as #{c.same_as})" if c.same_as is not None else (f" ({c.skipped})" if c.skipped else "")
            lines.append(f"{i:>3} {mix:>24} {c.layers_removed:>7} {c.kv_groups_removed:>4} {c.hidden_size:>6} "
                         f"{c.experts_removed:>8} {c.mlp_neurons:>7} {c.parameters:>12,} {kl:>10}{mark}{note}")
        logger.info("\n".join(lines))
