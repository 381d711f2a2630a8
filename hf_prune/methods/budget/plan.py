"""Candidate shapes for a parameter budget, and their exact parameter counts.

A candidate spends shares of the parameters to remove on four coarse axes (decoder layers,
attention KV groups, residual channels, and in a mixture of experts the routed experts of every
MoE layer); the MLP neurons, the finest axis, take the rest, their count solved so that the kept
non-embedding parameters land on the target within one rounding unit (``round_to`` neurons in
every kept layer; in a mixture of experts, in every routed expert). Counts are measured, not derived from formulas:
the same surgery that prunes (``hf_prune.surgery``) is run on a weightless copy of the model on
the meta device, and its parameters are counted, so every family the surgery supports is
counted exactly (fused projections, biases, q/k norms, tied heads).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ...errors import PruningConfigError, UnsupportedArchitectureError
from ...surgery.expert_neurons import apply_expert_sizes, expert_neuron_sizes
from ...surgery.experts import remove_experts, set_expert_count
from ...surgery.geometry import attention_geometry, operator
from ...surgery.hidden import check_hidden_pruning, coupled_attention, hidden_size_multiple, prune_hidden
from ...surgery.layers import remove_layers
from ...surgery.shrink import shrink_attention, shrink_mlp
from ...walker.layout import DecoderLayout
from ..experts import ExpertPruner, ExpertPruningConfig, router_groups
from ..structured.base import kept_count, kept_groups

#: axes a mix spends shares on, in the order of a mix's entries; MLP neurons take the rest. A mix may leave out
#: the last axis (routed experts, which only mixtures of experts have): three shares spend none on it.
MIX_AXES = ("depth", "heads", "hidden", "experts")


def non_embedding_parameters(model: nn.Module) -> int:
    """Distinct parameters of ``model`` outside its embeddings: everything but the ``nn.Embedding`` modules
    (token and position embeddings) and the LM head (tied weights counted once, as elsewhere)."""
    excluded = {id(p) for module in model.modules() if isinstance(module, nn.Embedding) for p in module.parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        excluded |= {id(p) for p in head.parameters()}
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen and id(param) not in excluded:
            seen.add(id(param))
            total += param.numel()
    return total


def _shared_attributes(model: nn.Module, memo: dict) -> None:
    """Objects hf_prune attaches to a model (tokenizer, source paths) are shared by a copy, not copied."""
    for name, value in vars(model).items():
        if name.startswith("_hf_prune"):
            memo[id(value)] = value


def model_copy(model: nn.Module) -> nn.Module:
    """An independent copy of ``model`` (weights copied where they are; the tokenizer it carries shared)."""
    memo: dict = {}
    _shared_attributes(model, memo)
    return copy.deepcopy(model, memo)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (shapes only, no memory)."""
    memo: dict = {}
    _shared_attributes(model, memo)
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) in memo:
            continue
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(
            tensor, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


@dataclass(frozen=True)
class Shape:
    """What a candidate removes, as the pruning configs it becomes take it.

    ``layers_removed`` decoder layers (``DepthConfig.num_layers``), ``head_amount`` of each layer's KV groups
    and ``neuron_amount`` of its MLP neurons, or of every routed expert's neurons in a mixture of experts
    (``StructuredConfig``), the kept ``hidden_size`` (``HiddenSizeConfig``; ``None`` keeps it) and the routed
    experts every MoE layer keeps (``ExpertPruningConfig.num_experts_to_keep``; ``None`` keeps them all)."""

    layers_removed: int = 0
    head_amount: float = 0.0
    hidden_size: int | None = None
    neuron_amount: float = 0.0
    experts_kept: int | None = None


def _keep_first_experts(layout: DecoderLayout, kept: int) -> None:
    """Keep the first ``kept`` routed experts of every MoE layer and write the count into the config."""
    old = None
    for index in range(len(layout)):
        for bank in layout.expert_banks(index):
            old = bank.num_experts
            remove_experts(layout, index, bank, range(kept))
    if old is not None and old != kept:
        set_expert_count(layout.model, old, kept)


def apply_shape_to_skeleton(skeleton: nn.Module, shape: Shape, neuron_multiple: int) -> None:
    """Give ``skeleton`` (a meta copy) the sizes ``shape`` leaves, by the same surgery pruning uses (which units
    are kept does not change the count)."""
    layout = DecoderLayout(skeleton)
    if shape.layers_removed:
        remove_layers(layout, range(len(layout) - shape.layers_removed))
        layout = DecoderLayout(skeleton)
    if shape.experts_kept is not None:
        _keep_first_experts(layout, shape.experts_kept)
    expert_widths = expert_neuron_sizes(layout)
    for index in range(len(layout)):
        if shape.head_amount > 0:
            geometry = attention_geometry(layout, index)
            if geometry.kv_heads:
                keep = kept_groups(geometry.kv_heads, geometry.group, shape.head_amount)
                shrink_attention(layout, index, torch.arange(keep))
        if shape.neuron_amount > 0 and expert_widths is None:
            width = operator(layout, index, layout.spec.mlp_out).in_features
            shrink_mlp(layout, index, torch.arange(kept_count(width, shape.neuron_amount, neuron_multiple)))
    if shape.neuron_amount > 0 and expert_widths is not None:  # the routed experts' neurons, as structured does
        apply_expert_sizes(layout, [None if width is None else kept_count(width, shape.neuron_amount, neuron_multiple)
                                    for width in expert_widths])
    if shape.hidden_size is not None and shape.hidden_size != layout.hidden_size:
        def first_channels(layout: DecoderLayout, index: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
            rows = torch.arange(keep).expand(attention_geometry(layout, index).heads, keep)
            return rows, rows

        prune_hidden(layout, torch.arange(shape.hidden_size), first_channels)


@dataclass
class Candidate:
    """One mix tried by the search: the shares asked, the shape they became, and what was measured."""

    mix: tuple[float, ...]
    shape: Shape | None = None
    layers_removed: int = 0
    kv_groups_removed: int = 0
    hidden_size: int | None = None
    mlp_neurons: int | None = None
    experts_removed: int = 0
    parameters: int | None = None
    kl: float | None = None
    skipped: str | None = None
    same_as: int | None = None

    def to_dict(self) -> dict:
        """The candidate as the pruning record keeps it."""
        return {"mix": [round(float(s), 6) for s in self.mix], "layers_removed": self.layers_removed,
                "kv_groups_removed": self.kv_groups_removed, "hidden_size": self.hidden_size,
                "mlp_neurons": self.mlp_neurons, "experts_removed": self.experts_removed,
                "neuron_amount": None if self.shape is None else round(self.shape.neuron_amount, 6),
                "parameters": self.parameters, "kl": None if self.kl is None else round(self.kl, 6),
                "skipped": self.skipped, "same_as": self.same_as}


def full_mix(mix: tuple[float, ...] | list[float]) -> tuple[float, ...]:
    """``mix`` with a share for every axis of ``MIX_AXES`` (a mix that leaves out the experts spends none on them)."""
    return tuple(float(s) for s in mix) + (0.0,) * (len(MIX_AXES) - len(mix))


@dataclass
class BudgetPlanner:
    """Exact kept-parameter counts of candidate shapes of one model, and the search's candidates.

    ``target`` is the non-embedding parameter count to keep; ``round_to`` the multiple kept MLP neuron and
    hidden-channel counts are rounded to. In a mixture of experts the neurons are those of every routed
    expert (dense MLP layers and shared experts with their own size field keep theirs, as structured
    pruning leaves them) and whole routed experts are a fourth coarse axis.
    """

    model: nn.Module
    target: int
    round_to: int = 8
    dense: int = 0
    layers: int = 0
    kv_heads: int = 0
    hidden: int = 0
    width: int = 0
    hidden_step: int = 1
    #: routed experts per MoE layer (0: a dense model), removed in steps of ``expert_step`` (router groups)
    experts: int = 0
    expert_step: int = 1
    #: the most routed experts per MoE layer expert pruning may remove (top-k and router groups allow)
    removable_experts: int = 0
    #: axis -> why the model cannot take it (absent: available)
    unavailable: dict[str, str] = field(default_factory=dict)
    #: axis -> non-embedding parameters one unit of it removes from the dense model
    unit_removal: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layout = DecoderLayout(self.model)
        self.dense = non_embedding_parameters(self.model)
        self.layers = len(layout)
        self.hidden = int(layout.hidden_size or 0)
        if self._read_experts(layout):
            self.unavailable["heads"] = ("structured methods keep the attention heads of mixture-of-experts models "
                                         "(heads=True is refused there)")
        else:
            self.unavailable["experts"] = "the model has no routed experts"
            try:
                self.width = max(operator(layout, i, layout.spec.mlp_out).in_features for i in range(self.layers))
            except (UnsupportedArchitectureError, AttributeError, TypeError) as err:
                raise UnsupportedArchitectureError(
                    f"a parameter budget is spent partly on MLP neurons, which {layout.model_type} does not expose "
                    f"({err}); dense decoder-only families and mixtures of experts are supported") from None
        if "heads" not in self.unavailable:
            try:
                self.kv_heads = max(attention_geometry(layout, i).kv_heads for i in range(self.layers))
            except UnsupportedArchitectureError as err:
                self.unavailable["heads"] = str(err)
        self.coupled = coupled_attention(layout)
        try:
            self.hidden_step = math.lcm(self.round_to, hidden_size_multiple(layout))
        except UnsupportedArchitectureError:
            self.hidden_step = self.round_to  # the hidden axis is probed below and marked unavailable
        probes = {"depth": (Shape(layers_removed=1), self.layers > 1, "the model has one decoder layer"),
                  "heads": (Shape(head_amount=1 / max(self.kv_heads, 1)), self.kv_heads > 1,
                            "every layer has a single KV group"),
                  "hidden": (Shape(hidden_size=self.hidden - self.hidden_step), self.hidden > self.hidden_step,
                             f"the hidden size is not above one step of {self.hidden_step} channels"),
                  "experts": (Shape(experts_kept=self.experts - self.expert_step), self.removable_experts > 0,
                              f"expert pruning cannot remove {self.expert_step} of the {self.experts} routed experts "
                              "per layer (each token's top-k and the router groups need them)")}
        for axis, (shape, possible, reason) in probes.items():
            if axis in self.unavailable:
                continue
            if not possible:
                self.unavailable[axis] = reason
                continue
            try:
                if axis == "hidden":  # the dry run hidden-size pruning refuses families with, before any work
                    check_hidden_pruning(self.model, shape.hidden_size)
                self.unit_removal[axis] = self.dense - self.count(shape)
            except (UnsupportedArchitectureError, ValueError, RuntimeError, AttributeError, TypeError) as err:
                self.unavailable[axis] = f"{type(err).__name__}: {err}"

    def _read_experts(self, layout: DecoderLayout) -> bool:
        """Set the routed-expert width, count and removable experts of a mixture of experts; ``False`` for a
        dense model. Raises for experts structured pruning cannot shrink (unreadable, of different widths)."""
        unreadable = [f"{layout.layer_prefix(i)}.{p}" for i in range(self.layers) for p in layout.unreadable_experts(i)]
        if unreadable:
            raise UnsupportedArchitectureError(f"a parameter budget cannot read the stacked expert weights of "
                                               f"{', '.join(unreadable[:3])} ({layout.model_type})")
        widths = expert_neuron_sizes(layout)
        if widths is None:
            return False
        if len({w for w in widths if w is not None}) != 1:
            raise UnsupportedArchitectureError(f"the routed experts of {layout.model_type} have different widths "
                                               f"{sorted({w for w in widths if w is not None})}; a parameter budget "
                                               "removes the same neuron count from every expert")
        self.width = next(w for w in widths if w is not None)
        self.experts = max(bank.num_experts for i in range(self.layers) for bank in layout.expert_banks(i))
        self.expert_step = router_groups(self.model.config)
        try:
            self.removable_experts = self._most_removable_experts(layout)
        except UnsupportedArchitectureError as err:
            self.unavailable["experts"] = str(err)
        return True

    def _most_removable_experts(self, layout: DecoderLayout) -> int:
        """The most routed experts per MoE layer that expert pruning accepts to remove (its own checks)."""
        most = 0
        for removed in range(self.expert_step, self.experts, self.expert_step):
            try:
                pruner = ExpertPruner(ExpertPruningConfig(num_experts_to_keep=self.experts - removed))
                pruner.validate_layout(layout)
            except (PruningConfigError, ValueError):
                break
            most = removed
        return most

    @property
    def neuron_multiple(self) -> int:
        return self.round_to

    def count(self, shape: Shape) -> int:
        """Non-embedding parameters the model keeps after ``shape`` (measured on a meta copy)."""
        skeleton = meta_copy(self.model)
        apply_shape_to_skeleton(skeleton, shape, self.neuron_multiple)
        return non_embedding_parameters(skeleton)

    def _with_neurons(self, shape: Shape, kept: int) -> Shape:
        return replace(shape, neuron_amount=0.0 if kept >= self.width else 1.0 - kept / self.width)

    def solve_neurons(self, shape: Shape) -> tuple[Shape, int, int, int]:
        """``shape`` with the MLP neuron share that brings the kept count nearest the target.

        Returns the shape, its kept parameter count, the kept neurons per (widest) layer and the rounding unit
        (parameters of ``round_to`` neurons in every kept layer)."""
        step = self.neuron_multiple
        full = self.count(shape)
        fewer = self.count(self._with_neurons(shape, self.width - step)) if self.width > step else full
        unit = full - fewer
        if unit <= 0:
            return shape, full, self.width, 0
        # kept neurons are multiples of step (kept_count rounds so) or the whole width
        options = sorted({self.width, *range(step, self.width + 1, step)})
        guess = self.width - (full - self.target) / (unit / step)
        nearest = min(options, key=lambda kept: abs(kept - guess))
        best: tuple[int, int] | None = None
        position = options.index(nearest)
        for kept in options[max(0, position - 1): position + 2]:
            params = self.count(self._with_neurons(shape, kept))
            if best is None or abs(params - self.target) < abs(best[1] - self.target):
                best = (kept, params)
        kept, params = best
        return self._with_neurons(shape, kept), params, kept, unit

    def candidate(self, mix: tuple[float, ...]) -> Candidate:
        """The candidate of ``mix`` (shares of the removal spent on depth, heads, hidden size and routed experts;
        neurons the rest): each coarse axis takes the whole units nearest its share (all rounded down instead
        when that would remove more than the budget), and the neurons the rest."""
        mix = full_mix(mix)
        candidate = Candidate(mix)
        removal = self.dense - self.target
        exact: dict[str, float] = {}
        limits = {"depth": self.layers - 1, "heads": self.kv_heads - 1,
                  "hidden": self.hidden // self.hidden_step - 1,
                  "experts": self.removable_experts // self.expert_step}
        for axis, share in zip(MIX_AXES, mix):
            if share <= 0:
                exact[axis] = 0.0
                continue
            if axis in self.unavailable:
                candidate.skipped = f"{axis}: {self.unavailable[axis]}"
                return candidate
            exact[axis] = min(limits[axis], share * removal / self.unit_removal[axis])
        if self.coupled and exact["heads"] and exact["hidden"]:
            candidate.skipped = ("heads and hidden size together: this family's head width is hidden_size / heads, "
                                 "so hidden-size pruning needs every head kept")
            return candidate
        try:
            # whole units nearest the shares, unless they leave less than the target: then rounded down
            units = {axis: math.floor(value + 0.5) for axis, value in exact.items()}
            if self.count(self._coarse_shape(units)) < self.target:
                units = {axis: math.floor(value) for axis, value in exact.items()}
            shape, params, neurons, unit = self.solve_neurons(self._coarse_shape(units))
        except (UnsupportedArchitectureError, ValueError, RuntimeError) as err:
            candidate.skipped = f"{type(err).__name__}: {err}"
            return candidate
        if abs(params - self.target) > max(unit, 0):
            experts = f", {units['experts'] * self.expert_step} routed experts per layer" if self.experts else ""
            candidate.skipped = (f"cannot reach the target: with {units['depth']} layers, {units['heads']} KV groups"
                                 f"{experts} and {units['hidden'] * self.hidden_step} hidden channels removed, the "
                                 f"{'expert' if self.experts else 'MLP'} neurons leave {params} parameters (target "
                                 f"{self.target})")
            return candidate
        candidate.shape = shape
        candidate.layers_removed = units["depth"]
        candidate.kv_groups_removed = units["heads"]
        candidate.hidden_size = shape.hidden_size if shape.hidden_size is not None else self.hidden
        candidate.experts_removed = units["experts"] * self.expert_step
        candidate.mlp_neurons = neurons
        candidate.parameters = params
        return candidate

    def _coarse_shape(self, units: dict[str, int]) -> Shape:
        """The shape removing ``units`` whole layers, KV groups, hidden steps and expert steps (no neurons)."""
        return Shape(layers_removed=units["depth"],
                     head_amount=units["heads"] / self.kv_heads if units["heads"] else 0.0,
                     hidden_size=self.hidden - units["hidden"] * self.hidden_step if units["hidden"] else None,
                     experts_kept=self.experts - units["experts"] * self.expert_step if units["experts"] else None)

    def rounding_unit(self, shape: Shape) -> int:
        """Parameters of ``round_to`` MLP neurons in every layer ``shape`` keeps (in a mixture of experts, in every
        routed expert it keeps): how closely the neurons can land on the target."""
        full = self.count(replace(shape, neuron_amount=0.0))
        if self.width <= self.neuron_multiple:
            return 0
        return full - self.count(self._with_neurons(shape, self.width - self.neuron_multiple))
