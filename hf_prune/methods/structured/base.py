"""The shared part of structured methods: configuration, kept counts, and shrinking per layer.

A structured method scores the MLP neurons (and, with ``heads=True``, the attention KV
groups) of each decoder layer after the engine's statistics pass, keeps the best ones and
removes the rest physically; the engine then recomputes the layer's outputs for the next
layer. Subclasses only say how to score.

In a mixture-of-experts model the neurons removed are those inside each routed expert: every
expert of every MoE layer keeps the same number (``amount`` of its neurons removed, rounded
to ``round_to``), each chosen by the expert's own scores (``score_expert_neurons``), so the
kept width can be written into the config's expert size field. Routers are untouched. Dense
MLP layers and shared experts with their own size field are left as they are; shared experts
the config sizes from the routed experts' field (DeepSeek-V3, Llama 4) keep ``factor x`` the
experts' count, scored like a dense MLP.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass

import torch
from transformers.utils import logging

from ...config import PruningConfig
from ...engine.statistics import InputStatistics, StatKind
from ...errors import PruningConfigError, UnsupportedArchitectureError, UnsupportedOperatorError
from ...surgery.expert_neurons import (
    SharedExpert,
    shrink_expert_neurons,
    shrink_shared_expert,
    tied_shared_expert,
)
from ...surgery.geometry import attention_geometry, attention_input_names, operator
from ...surgery.shrink import shrink_attention, shrink_mlp
from ...walker.experts import ExpertBank
from ...walker.layout import DecoderLayout, Operator
from ..base import LayerContext, LayerPruner

logger = logging.get_logger(__name__)

DEFAULT_AMOUNT = 0.3


@dataclass
class StructuredConfig(PruningConfig):
    """Fields shared by structured methods (MLP neurons, optionally attention heads).

    Args:
        sparsity: for structured methods, the same as ``amount``: the share of MLP neurons
            removed (``--sparsity`` on the command line sets it); default 0.3.
        amount: share of each layer's MLP neurons removed, in [0, 1), the same in every layer.
            ``sparsity`` mirrors it (pass either; they may not differ); ``pattern`` must stay
            ``"unstructured"``: nothing is zeroed, whole neurons leave the weights. The
            recorded ``measured_sparsity`` therefore counts no zeros; the record's
            ``structure`` entry holds the kept sizes and parameter counts instead.
        heads: also remove attention heads (whole KV groups with their query heads).
        head_amount: share of each layer's KV groups removed; default ``amount``.
        round_to: kept neuron counts are rounded to the nearest multiple of this (default 8),
            so that the MLP widths stay usable by N:M patterns (2:4, 4:8) and fast kernels.
            The removed share is therefore within ``round_to / 2`` neurons of ``amount``.
        tensor_parallel_size: keep head counts that shard over this many GPUs (with
            ``heads=True``): the kept query heads are a multiple of it, and the kept KV heads a
            multiple of it or a divisor of it, as vLLM's tensor parallelism requires; the kept
            KV group count is the one nearest ``head_amount`` that does (ties: the larger).
            Kept neuron counts are then also multiples of it (of ``lcm(round_to, size)``).
    """

    sparsity: float | None = None
    amount: float | None = None
    heads: bool = False
    head_amount: float | None = None
    round_to: int = 8
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        self._check_types()  # amount and sparsity are compared before the shared checks run
        amount = self.amount if self.amount is not None else self.sparsity
        amount = DEFAULT_AMOUNT if amount is None else amount
        if (self.amount is not None and self.sparsity is not None
                and not math.isclose(self.amount, self.sparsity, abs_tol=1e-9)):
            raise PruningConfigError(
                "amount", f"amount={self.amount} and sparsity={self.sparsity} differ: structured methods remove a "
                "share `amount` of the MLP neurons and record it as sparsity; pass only amount"
            )
        self.amount = amount
        self.sparsity = amount
        if self.pattern != "unstructured":
            raise PruningConfigError(
                "pattern", f"pattern={self.pattern!r} does not apply to {type(self).__name__}: it removes whole "
                "neurons and heads. To add an N:M pattern, prune again afterwards with e.g. WandaConfig(pattern='2:4')"
            )
        if not 0 <= self.amount < 1:
            raise PruningConfigError(
                "amount", f"amount must be in [0, 1) (the share of MLP neurons removed), got {self.amount!r}"
            )
        super().__post_init__()
        if self.head_amount is not None and not 0 <= self.head_amount < 1:
            raise PruningConfigError("head_amount", f"head_amount must be None or in [0, 1), got {self.head_amount!r}")
        if self.round_to < 1:
            raise PruningConfigError(
                "round_to", f"round_to must be a positive integer (1 = no rounding), got {self.round_to!r}"
            )
        if self.tensor_parallel_size < 1:
            raise PruningConfigError(
                "tensor_parallel_size",
                f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}",
            )
        if self.tensor_parallel_size > 1 and not self.heads:
            raise PruningConfigError(
                "tensor_parallel_size",
                f"tensor_parallel_size={self.tensor_parallel_size} rounds the kept attention heads, which only "
                "heads=True removes; pass heads=True or leave tensor_parallel_size at 1"
            )
        if self.targets is not None:
            raise PruningConfigError(
                "targets", f"{type(self).__name__} chooses its operators itself (MLP neurons, plus attention heads "
                "with heads=True); leave targets unset"
            )
        if self.owl is not None:
            raise PruningConfigError(
                "owl", f"owl sets unstructured per-layer sparsities and does not apply to {type(self).__name__}"
            )

    @property
    def effective_head_amount(self) -> float:
        return self.amount if self.head_amount is None else float(self.head_amount)

    @property
    def neuron_multiple(self) -> int:
        """Kept neuron counts are multiples of this: ``round_to`` and the tensor-parallel size."""
        return math.lcm(self.round_to, self.tensor_parallel_size)


def _has_experts(layout: DecoderLayout) -> bool:
    """Whether any decoder layer holds stacked routed-expert weights (readable or not)."""
    return any(layout.expert_banks(i) or layout.unreadable_experts(i) for i in range(len(layout)))


def kept_count(width: int, amount: float, round_to: int = 1) -> int:
    """Units kept out of ``width`` when removing ``amount`` of them, rounded to a multiple of ``round_to``."""
    if amount <= 0 or width == 0:
        return width
    exact = width * (1.0 - amount)
    kept = round_to * math.floor(exact / round_to + 0.5)
    return max(0, min(width, kept))


def shardable(kv_heads: int, group: int, tensor_parallel_size: int) -> bool:
    """Whether ``kv_heads`` KV heads with ``group`` query heads each split over ``tensor_parallel_size`` GPUs.

    vLLM splits the query heads evenly, and the KV heads evenly when there are at least as many
    as GPUs, else replicates them (so their count must divide the GPU count).
    """
    size = tensor_parallel_size
    if kv_heads == 0 or (kv_heads * group) % size:
        return False
    return kv_heads % size == 0 if kv_heads >= size else size % kv_heads == 0


def kept_groups(kv_heads: int, group: int, amount: float, tensor_parallel_size: int = 1) -> int:
    """KV groups kept out of ``kv_heads`` when removing ``amount`` of them, shardable over
    ``tensor_parallel_size`` GPUs (the nearest such count; ties keep more)."""
    target = kept_count(kv_heads, amount)
    if tensor_parallel_size == 1 or kv_heads == 0:
        return target
    valid = [k for k in range(1, kv_heads + 1) if shardable(k, group, tensor_parallel_size)]
    if not valid:
        raise ValueError(
            f"no number of KV heads up to {kv_heads} (with {group} query heads each) splits over "
            f"tensor_parallel_size={tensor_parallel_size} GPUs; choose a size that divides the head counts"
        )
    return min(valid, key=lambda k: (abs(k - target), -k))


def top_units(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, in increasing index order (ties: lower index first)."""
    order = torch.argsort(scores.float().cpu(), descending=True, stable=True)
    return order[:count].sort().values


class StructuredPruner(LayerPruner):
    """Scores, keeps and removes whole neurons (and KV groups) in ``finish_layer``."""

    prunes_operators = False
    #: whether the scores use activation statistics of the MLP and attention operators
    uses_activations = True
    #: whether the method scores the neurons inside routed experts (``score_expert_neurons``)
    scores_expert_neurons = False

    def __init__(self, config: StructuredConfig) -> None:
        super().__init__(config)
        self.config: StructuredConfig = config
        self._statistics_names: set[str] = set()
        #: whether the model is a mixture of experts (set by ``validate_layout``)
        self._experts: bool | None = None
        #: per MoE layer: {"layer", "module", "kept", "of", "shared"} (logged; see ``expert_layers``)
        self.expert_layers: list[dict] = []

    def validate_layout(self, layout: DecoderLayout) -> None:
        """Refuse mixtures of experts this method cannot shrink, before any work."""
        self._experts = _has_experts(layout)
        if not self._experts:
            return
        name = type(self.config).method
        unreadable = [f"{layout.layer_prefix(i)}.{p}" for i in range(len(layout)) for p in layout.unreadable_experts(i)]
        if unreadable:
            raise UnsupportedArchitectureError(
                f"{name} cannot read the stacked expert weights of {', '.join(unreadable[:3])} ({layout.model_type}); "
                "open an issue with the model id")
        if not self.scores_expert_neurons:
            raise UnsupportedOperatorError(
                f"{name} ranks the neurons of one dense MLP per layer and has no rule for the routed experts of "
                f"{type(layout.model).__name__} ({layout.model_type}); remove expert neurons with "
                "'activation-norm-structured' (ActivationNormStructuredConfig) or 'l1-norm-structured', or whole "
                "experts with 'expert-pruning' (ExpertPruningConfig)")
        if self.config.heads:
            raise UnsupportedArchitectureError(
                f"{name} with heads=True: attention heads of mixture-of-experts models ({layout.model_type}) are not "
                "removed; pass heads=False to remove the routed experts' neurons, or prune the heads of a dense model")
        widths = {bank.intermediate_size for i in range(len(layout)) for bank in layout.expert_banks(i)}
        if len(widths) != 1:
            raise UnsupportedArchitectureError(
                f"{name}: the routed experts of {layout.model_type} have different widths {sorted(widths)}; every "
                "expert keeps the same neuron count, so they must start from one width")

    def statistics_kind(self, op: Operator) -> StatKind:
        if not self.uses_activations:
            return StatKind.NONE
        return StatKind.NORMS if op.local_name in self._statistics_names else StatKind.NONE

    def start_layer(self, context: LayerContext) -> None:
        if self._uses_experts(context.layout):
            self._statistics_names = set()
            for bank in context.layout.expert_banks(context.index):
                down = next(p.parameter for p in bank.projections if p.role == "down")
                self._statistics_names |= {f"{bank.path}.{down}.{e}" for e in range(bank.num_experts)}
                shared = tied_shared_expert(context.layout, context.index, bank)
                if shared is not None:
                    self._statistics_names.add(f"{shared.path}.down_proj")
            return
        spec = context.layout.spec
        names = {*spec.mlp_in, spec.mlp_out}
        if self.config.heads:
            names |= {spec.o, *attention_input_names(context.layout)}
        self._statistics_names = names

    def validate(self, op: Operator) -> None:
        return None

    def prune_weight(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} removes whole neurons in finish_layer, not weights one by one")

    # scoring, implemented by each method -----------------------------------------------------------------
    @abstractmethod
    def score_neurons(self, context: LayerContext) -> torch.Tensor:
        """Importance of each MLP neuron of this layer (higher = kept)."""

    @abstractmethod
    def score_groups(self, context: LayerContext) -> torch.Tensor:
        """Importance of each attention KV group of this layer (higher = kept)."""

    def score_expert_neurons(self, context: LayerContext, bank: ExpertBank) -> torch.Tensor:
        """``[experts, neurons]``: importance of each neuron of each routed expert of ``bank`` (higher = kept)."""
        raise UnsupportedOperatorError(f"{type(self).__name__} does not score the neurons of routed experts")

    def score_shared_neurons(self, context: LayerContext, shared: SharedExpert) -> torch.Tensor:
        """Importance of each neuron of a shared expert tied to the routed experts' size (higher = kept)."""
        raise UnsupportedOperatorError(f"{type(self).__name__} does not score the neurons of shared experts")

    def _uses_experts(self, layout: DecoderLayout) -> bool:
        if self._experts is None:  # validate_layout not run (a pruner driven by hand)
            self.validate_layout(layout)
        return bool(self._experts)

    def finish_expert_layer(self, context: LayerContext) -> bool:
        """Remove the same share of neurons from every routed expert of this layer (tied shared experts too)."""
        changed = False
        for bank in context.layout.expert_banks(context.index):
            width = bank.intermediate_size
            keep = kept_count(width, self.config.amount, self.config.neuron_multiple)
            shared = tied_shared_expert(context.layout, context.index, bank)
            if keep == width:
                continue
            scores = self.score_expert_neurons(context, bank)
            neurons = torch.stack([top_units(scores[e], keep) for e in range(bank.num_experts)])
            shared_kept = None
            if shared is not None:  # score before the routed experts change: nothing of the shared path does
                shared_kept = min(shared.width, keep * shared.factor)
                shrink_shared_expert(shared, top_units(self.score_shared_neurons(context, shared), shared_kept))
            changed |= shrink_expert_neurons(bank, neurons) > 0
            self.expert_layers.append({"layer": context.index, "module": bank.path, "kept": keep, "of": width,
                                       "shared": shared_kept})
            logger.info("%s: layer %d keeps %d of %d neurons in each of its %d routed experts%s",
                        type(self.config).method, context.index, keep, width, bank.num_experts,
                        f" and {shared_kept} in {shared.path}" if shared is not None else "")
        return changed

    def layer_done(self, context: LayerContext, neurons: torch.Tensor, scores: torch.Tensor | None) -> None:
        """Called after the layer was shrunk, with the kept neurons and all neurons' scores."""
        return None

    # the shared procedure ------------------------------------------------------------------------------------
    def finish_layer(self, context: LayerContext) -> bool:
        layout, index = context.layout, context.index
        if self._uses_experts(layout):
            return self.finish_expert_layer(context)
        changed = False
        if self.config.heads:
            geometry = attention_geometry(layout, index)
            if geometry.kv_heads:
                keep = kept_groups(geometry.kv_heads, geometry.group, self.config.effective_head_amount,
                                   self.config.tensor_parallel_size)
                scores = self.score_groups(context)
                changed |= shrink_attention(layout, index, top_units(scores, keep)) > 0
        width = operator(layout, index, layout.spec.mlp_out).in_features
        scores = None
        neurons = torch.arange(width, device="cpu")
        if width:
            scores = self.score_neurons(context)
            neurons = top_units(scores, kept_count(width, self.config.amount, self.config.neuron_multiple))
            changed |= shrink_mlp(layout, index, neurons) > 0
        self.layer_done(context, neurons, scores)
        return changed

