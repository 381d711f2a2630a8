"""Expert pruning: remove whole routed experts of every mixture-of-experts layer, chosen on calibration data.

During the engine's sequential pass each MoE block's experts run on the tokens the router
sent them (``engine.experts``), and every expert's output on those tokens is seen before its
gate is applied. Scores per expert ``j`` of a layer (``score``):

* ``"reap"`` (REAP, Lasby et al., arXiv 2510.13999): ``S_j = 1/N_j · Σ_t g_j(t) · ‖f_j(t)‖₂``
  over the ``N_j`` calibration tokens routed to ``j``, with ``g_j(t)`` the router's gate value
  (the weight of the expert's output in the block's output) and ``f_j(t)`` the expert's output.
  An expert routed no token scores 0. For Llama 4, whose experts receive inputs already
  multiplied by their gate, ``g_j(t) · f_j(t)`` is replaced by the expert's output on that input.
* ``"frequency"``: ``N_j``, the calibration tokens routed to ``j`` (a baseline).

Once a layer's pass is done, its lowest-scored experts are removed
(``hf_prune.surgery.experts.remove_experts``): their slices of the stacked expert weights and
biases and their rows of the router (weight, bias, DeepSeek-V3's score-correction bias), so the
router chooses among the kept experts only. The next layer is calibrated on the pruned layer's
outputs. Every MoE layer keeps the same number of experts, written into the config's expert
count (``num_local_experts``, ``num_experts`` or ``n_routed_experts``), so the checkpoint is an
ordinary one of its family. For group-limited routing (DeepSeek-V3's ``n_group``) the same
number is removed from every group, which keeps the groups contiguous and equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.utils import logging

from ..config import PruningConfig
from ..engine.offload import is_offloaded
from ..engine.statistics import InputStatistics, StatKind
from ..errors import PruningConfigError, UnsupportedArchitectureError
from ..report import count_parameters
from ..surgery.experts import expert_count_field, find_router, remove_experts, set_expert_count
from ..walker.layout import DecoderLayout, Operator
from .base import LayerContext, LayerPruner, ModelContext

logger = logging.get_logger(__name__)

SCORES = ("reap", "frequency")
DEFAULT_AMOUNT = 0.25
#: key of the pruning record entry listing the removed experts
RECORD_KEY = "removed_experts"


@dataclass
class ExpertPruningConfig(PruningConfig):
    """Remove whole routed experts from every mixture-of-experts layer, chosen on calibration data.

    Args:
        amount: share of each MoE layer's routed experts removed, in [0, 1) (rounded to the
            nearest count); default 0.25 unless ``num_experts_to_keep`` is given. ``sparsity``
            mirrors it.
        num_experts_to_keep: exact number of routed experts every MoE layer keeps (instead of
            ``amount``); at least the router's ``num_experts_per_tok``.
        score: how experts are ranked: ``"reap"`` (default: mean over the calibration tokens
            routed to the expert of its gate value times the L2 norm of its output, arXiv
            2510.13999) or ``"frequency"`` (how many calibration tokens were routed to it).

    Shared experts, attention and dense layers are untouched. The config's expert count
    (``num_local_experts``, ``num_experts`` or ``n_routed_experts``) is the kept count, so plain
    transformers loads the checkpoint; the pruning record lists the removed experts per layer
    (``pruning_config.removed_experts``).
    """

    method: ClassVar[str] = "expert-pruning"
    paper: ClassVar[str] = "https://arxiv.org/abs/2510.13999"
    #: runs on mixture-of-experts models only (the method contract test uses one)
    needs_experts: ClassVar[bool] = True

    sparsity: float | None = None
    amount: float | None = None
    num_experts_to_keep: int | None = None
    score: str = "reap"

    def __post_init__(self) -> None:
        self._check_types()  # amount, sparsity and num_experts_to_keep are compared before the shared checks
        self._resolve_amount("num_experts_to_keep", 1, "routed experts kept per MoE layer",
                             "each MoE layer's routed experts", DEFAULT_AMOUNT)
        if self.pattern != "unstructured":
            raise PruningConfigError("pattern", f"pattern={self.pattern!r} does not apply to expert pruning, which "
                                     "removes whole experts; prune again afterwards with e.g. "
                                     "WandaConfig(pattern='2:4')")
        super().__post_init__()
        if self.score not in SCORES:
            raise PruningConfigError("score", f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.targets is not None:
            raise PruningConfigError("targets", "expert pruning removes routed experts of every MoE layer; leave "
                                     "targets unset")
        if self.owl is not None:
            raise PruningConfigError("owl", "owl sets unstructured per-layer sparsities and does not apply to expert "
                                     "pruning")

    def experts_to_keep(self, experts: int) -> int:
        """How many of a layer's ``experts`` routed experts this config keeps."""
        if self.num_experts_to_keep is not None:
            if self.num_experts_to_keep > experts:
                raise ValueError(f"num_experts_to_keep={self.num_experts_to_keep} exceeds the model's {experts} "
                                 "routed experts per layer")
            return self.num_experts_to_keep
        kept = experts - math.floor(experts * self.amount + 0.5)
        if kept < 1:
            raise ValueError(f"amount={self.amount} would remove all {experts} routed experts of each layer; lower it")
        return kept


def choose_experts(scores: torch.Tensor, keep: int, groups: int = 1) -> list[int]:
    """The ``keep`` highest-scored experts (ties: the lower index), in index order. With ``groups`` > 1
    the experts form that many contiguous, equal groups and each keeps ``keep / groups`` of its own."""
    count = scores.numel()
    size = count // groups
    per_group = keep // groups
    kept: list[int] = []
    for group in range(groups):
        members = range(group * size, (group + 1) * size)
        order = sorted(members, key=lambda e: (-float(scores[e]), e))
        kept += order[:per_group]
    return sorted(kept)


def router_groups(config: Any) -> int:
    """How many groups the router picks experts within (DeepSeek-V3's ``n_group``; 1 without groups)."""
    groups = getattr(config, "n_group", None)
    return int(groups) if isinstance(groups, int) and groups > 1 else 1


class ExpertPruner(LayerPruner):
    """Scores each routed expert from its outputs during the engine's pass and removes the
    lowest-scored ones in ``finish_layer``; writes the kept count into the config in ``finish_model``."""

    prunes_operators = False
    observes_expert_outputs = True

    def __init__(self, config: ExpertPruningConfig) -> None:
        super().__init__(config)
        self.config: ExpertPruningConfig = config
        self._sums: dict[int, torch.Tensor] = {}  # id(experts module) -> per-expert sum of g * ||f|| (fp64, CPU)
        self._tokens: dict[int, torch.Tensor] = {}  # id(experts module) -> per-expert routed tokens
        self.experts_before: int | None = None
        self.kept: int | None = None
        self.parameters_before: int | None = None
        #: per pruned layer: {"layer", "module", "removed", "tokens", "scores"}
        self.layers: list[dict[str, Any]] = []

    def statistics_kind(self, op: Operator) -> StatKind:
        return StatKind.NONE

    def validate(self, op: Operator) -> None:
        return None

    def prune_weight(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float) -> torch.Tensor:
        raise TypeError("expert pruning removes whole experts in finish_layer, not weights")

    def validate_layout(self, layout: DecoderLayout) -> None:
        model = layout.model
        banks = {index: layout.expert_banks(index) for index in range(len(layout))}
        unreadable = [f"{layout.layer_prefix(i)}.{p}" for i in range(len(layout)) for p in layout.unreadable_experts(i)]
        if unreadable:
            raise UnsupportedArchitectureError(
                f"expert pruning cannot read the stacked expert weights of {', '.join(unreadable[:3])}; open an issue "
                "with the model id")
        if not any(banks.values()):
            kinds = sorted({type(m).__name__ for m in layout.layers[0].modules() if m is not layout.layers[0]})
            raise UnsupportedArchitectureError(
                f"expert pruning removes routed experts, but {type(model).__name__} ({layout.model_type}) has no "
                f"stacked routed-expert weights in its {len(layout)} decoder layers (layer 0 holds "
                f"{', '.join(kinds[:8]) or 'no modules'}); use a structured method such as "
                "'activation-norm-structured' or 'depth' for dense models")
        counts = {bank.num_experts for found in banks.values() for bank in found}
        if len(counts) != 1:
            raise UnsupportedArchitectureError(f"the MoE layers hold different numbers of routed experts "
                                               f"{sorted(counts)}; expert pruning needs one count for the config")
        experts = counts.pop()
        try:
            keep = self.config.experts_to_keep(experts)
        except ValueError as err:
            raise PruningConfigError("num_experts_to_keep" if self.config.num_experts_to_keep is not None
                                     else "amount", str(err)) from None
        config = model.config
        top_k = getattr(config, "num_experts_per_tok", None)
        if isinstance(top_k, int) and keep < top_k:
            raise PruningConfigError(
                "amount", f"keeping {keep} of {experts} routed experts per layer leaves fewer than the "
                f"{top_k} each token is routed to (num_experts_per_tok); keep at least {top_k}")
        groups = router_groups(config)
        if groups > 1:
            removed = experts - keep
            if removed % groups or experts % groups:
                raise PruningConfigError(
                    "amount", f"the router picks experts within {groups} groups (n_group={groups}); remove a multiple "
                    f"of {groups} of the {experts} experts so that every group keeps as many, not {removed}")
            per_group = keep // groups
            topk_group = int(getattr(config, "topk_group", groups) or groups)
            if per_group < 2 or per_group * topk_group < (top_k or 1):
                raise PruningConfigError(
                    "amount", f"keeping {per_group} experts in each of the {groups} router groups is too few: the "
                    f"router scores a group by its best two experts and routes {top_k} experts within {topk_group} "
                    "groups; remove fewer experts")
        expert_count_field(config, experts)  # the config can say the kept count
        for index, found in banks.items():
            for bank in found:
                find_router(layout, index, bank)
        if is_offloaded(model) or len(set((getattr(model, "hf_device_map", None) or {"": 0}).values())) > 1:
            raise UnsupportedArchitectureError("expert pruning replaces the expert and router parameters, which "
                                               "accelerate's placement (device_map) holds; load the model without "
                                               "device_map")
        self.experts_before, self.kept = experts, keep
        self.parameters_before = count_parameters(model)

    def observe_expert_output(self, module: nn.Module, expert: int, gates: torch.Tensor | None,
                              output: torch.Tensor) -> None:
        key = id(module)
        if key not in self._sums:
            count = next(p for p in module.parameters(recurse=False) if p.dim() == 3).shape[0]
            self._sums[key] = torch.zeros(count, dtype=torch.float64)
            self._tokens[key] = torch.zeros(count, dtype=torch.long)
        norms = output.detach().float().norm(dim=-1)
        if gates is not None:
            norms = norms * gates.detach().float()
        self._sums[key][expert] += float(norms.sum())
        self._tokens[key][expert] += output.shape[0]

    def expert_scores(self, module: nn.Module, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, routed tokens)`` of the experts of ``module`` from the pass so far."""
        sums = self._sums.get(id(module), torch.zeros(experts, dtype=torch.float64))
        tokens = self._tokens.get(id(module), torch.zeros(experts, dtype=torch.long))
        if self.config.score == "frequency":
            return tokens.double(), tokens
        return sums / tokens.clamp(min=1).double(), tokens

    def finish_layer(self, context: LayerContext) -> bool:
        banks = context.layout.expert_banks(context.index)
        if not banks:
            return False
        if context.inputs is None:
            raise ValueError("expert pruning needs calibration data: experts are scored on the tokens routed to them")
        if self.kept is None:  # validate_layout not run (a pruner driven by hand)
            self.validate_layout(context.layout)
        groups = router_groups(context.layout.model.config)
        for bank in banks:
            scores, tokens = self.expert_scores(bank.module, bank.num_experts)
            keep = choose_experts(scores, self.kept, groups)
            self._sums.pop(id(bank.module), None)
            self._tokens.pop(id(bank.module), None)
            removed = remove_experts(context.layout, context.index, bank, keep)
            self.layers.append({
                "layer": context.index, "module": f"{context.layout.layer_prefix(context.index)}.{bank.path}",
                "removed": removed, "tokens": [int(t) for t in tokens],
                "scores": [round(float(s), 6) for s in scores],
            })
            logger.info("expert pruning (%s): layer %d removes experts %s of %d; scores %s", self.config.score,
                        context.index, removed, len(scores), [round(float(s), 4) for s in scores])
        return True

    def finish_model(self, context: ModelContext) -> None:
        if self.experts_before is None or self.kept is None:
            return
        field = set_expert_count(context.layout.model, self.experts_before, self.kept) \
            if self.kept != self.experts_before else expert_count_field(context.layout.model.config, self.kept)
        self.record_entries[RECORD_KEY] = {
            "score": self.config.score,
            "config_field": field,
            "experts_before": self.experts_before,
            "experts_after": self.kept,
            "parameters_before": self.parameters_before,
            "parameters_after": count_parameters(context.layout.model),
            "layers": self.layers,
        }
