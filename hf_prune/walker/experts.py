"""Fused expert weights of transformers 5 mixture-of-experts blocks.

A transformers 5 MoE block keeps all its routed experts in one ``experts`` module holding
3-D parameters: ``gate_up_proj`` (or ``up_proj`` for experts without a gate) and
``down_proj``, one slice per expert along dimension 0. The layout of a slice differs by
family: ``[E, 2I, H]`` / ``[E, H, I]`` (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3, Qwen3-Next,
GraniteMoeHybrid: ``(out, in)`` like ``nn.Linear``) or ``[E, H, 2I]`` / ``[E, I, H]``
(gpt-oss, Llama 4: ``(in, out)``). The gate and up halves of ``gate_up_proj`` are either
two blocks ``[gate; up]`` or interleaved rows ``gate_0, up_0, gate_1, ...`` (gpt-oss).

Classes decorated with transformers' ``use_experts_implementation`` say all this in their
attributes (``is_transposed``, ``is_concatenated``, ``has_gate``, ``has_bias``,
``has_post_expert_norm``) and take ``forward(hidden_states, top_k_index, top_k_weights)``.
Other expert classes are described in ``EXPERT_LAYOUTS`` (an exception table by class name).

An :class:`ExpertBank` describes one such module; every expert's slice of every projection
becomes its own ``Operator`` seen as ``(out, in)``. For work on whole experts (per-expert
FFN neurons, removing experts), :meth:`ExpertBank.neuron_rows` says which rows of the
gate/up slice and which columns of the down slice hold intermediate neuron ``j``, and
``num_experts`` / the parameters' first dimension index the experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError

#: Names of 3-D expert parameters the walker understands.
EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertLayout:
    """How an expert class stores its weights and is called.

    ``routing``: ``"top_k"`` for ``forward(hidden_states, top_k_index, top_k_weights)`` (each
    token goes to its top-k experts, whose outputs are weighted by the gate values after the
    expert); ``"prescaled"`` for Llama 4, whose experts get every token already multiplied by
    its gate value (0 for the experts it was not routed to) as one ``[E * tokens, H]`` input.
    """

    transposed: bool
    concatenated: bool = True
    has_gate: bool = True
    has_bias: bool = False
    has_post_expert_norm: bool = False
    routing: str = "top_k"


#: Expert classes that do not carry transformers' ``use_experts_implementation`` attributes.
EXPERT_LAYOUTS: dict[str, ExpertLayout] = {
    "Llama4TextExperts": ExpertLayout(transposed=True, routing="prescaled"),
}


@dataclass(frozen=True)
class ExpertProjection:
    """One 3-D parameter of an expert bank: ``role`` is ``"gate_up"``, ``"up"`` or ``"down"``."""

    parameter: str
    role: str
    bias: str | None = None


def _decorated_layout(module: nn.Module) -> ExpertLayout | None:
    if not all(hasattr(module, attr) for attr in ("is_transposed", "has_gate", "is_concatenated")):
        return None
    return ExpertLayout(
        transposed=bool(module.is_transposed), concatenated=bool(module.is_concatenated),
        has_gate=bool(module.has_gate), has_bias=bool(getattr(module, "has_bias", False)),
        has_post_expert_norm=bool(getattr(module, "has_post_expert_norm", False)),
    )


def three_d_parameters(module: nn.Module) -> list[str]:
    """Names of the module's own parameters with three dimensions."""
    return [name for name, param in module.named_parameters(recurse=False) if param.dim() == 3]


def looks_like_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds stacked expert weights (3-D ``down_proj`` and ``gate_up_proj``/``up_proj``)."""
    own = set(three_d_parameters(module))
    return "down_proj" in own and bool(own & {"gate_up_proj", "up_proj"})


@dataclass
class ExpertBank:
    """A module of stacked routed-expert weights inside a decoder layer (layer-relative ``path``)."""

    path: str
    module: nn.Module
    layout: ExpertLayout
    projections: tuple[ExpertProjection, ...]

    @property
    def num_experts(self) -> int:
        return int(getattr(self.module, self.projections[0].parameter).shape[0])

    @property
    def class_name(self) -> str:
        return type(self.module).__name__

    def stored(self, parameter: str) -> torch.Tensor:
        """The 3-D parameter as stored."""
        return getattr(self.module, parameter)

    def weight(self, parameter: str, expert: int) -> torch.Tensor:
        """Expert ``expert``'s slice of ``parameter`` as ``(out, in)`` (a view)."""
        stored = self.stored(parameter).data[expert]
        return stored.t() if self.layout.transposed else stored

    @property
    def intermediate_size(self) -> int:
        """Neurons per expert (columns of a down slice)."""
        return self.weight("down_proj", 0).shape[1]

    def neuron_rows(self, neurons: torch.Tensor) -> torch.Tensor:
        """Rows of one expert's ``(out, in)`` gate/up slice that hold intermediate ``neurons``
        (columns ``neurons`` of its down slice), for structured work on experts."""
        if not self.layout.has_gate:
            return neurons
        if self.layout.concatenated:
            return torch.cat([neurons, neurons + self.intermediate_size])
        return torch.stack([2 * neurons, 2 * neurons + 1], dim=1).reshape(-1)

    def row_neurons(self) -> torch.Tensor:
        """The intermediate neuron each row of an expert's ``(out, in)`` gate/up slice belongs to."""
        neurons = torch.arange(self.intermediate_size)
        if not self.layout.has_gate:
            return neurons
        return torch.cat([neurons, neurons]) if self.layout.concatenated else neurons.repeat_interleave(2)

    def _bias(self, projection: ExpertProjection, expert: int) -> torch.Tensor | None:
        if projection.bias is None:
            return None
        return getattr(self.module, projection.bias)[expert]

    def _projection(self, role: str) -> ExpertProjection:
        return next(p for p in self.projections if p.role == role)

    def activations(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """The input of expert ``expert``'s down projection for tokens ``x`` (``[tokens, hidden]``)."""
        first = self._projection("gate_up" if self.layout.has_gate else "up")
        h = nn.functional.linear(x, self.weight(first.parameter, expert), self._bias(first, expert))
        if not self.layout.has_gate:
            return self.module.act_fn(h)
        apply_gate = getattr(self.module, "_apply_gate", None)
        if apply_gate is not None:
            return apply_gate(h)
        gate, up = h.chunk(2, dim=-1)
        return self.module.act_fn(gate) * up

    def output(self, expert: int, h: torch.Tensor) -> torch.Tensor:
        """Expert ``expert``'s output for down-projection inputs ``h`` (before its gate value)."""
        down = self._projection("down")
        y = nn.functional.linear(h, self.weight(down.parameter, expert), self._bias(down, expert))
        if self.layout.has_post_expert_norm:
            y = self.module.post_expert_norm(y)
        return y


def read_expert_bank(path: str, module: nn.Module, hidden_size: int | None) -> ExpertBank:
    """Describe an experts module, checking its parameter shapes against ``hidden_size``.

    Raises ``UnsupportedArchitectureError`` when the class's layout is unknown or its shapes
    contradict it.
    """
    layout = _decorated_layout(module) or EXPERT_LAYOUTS.get(type(module).__name__)
    if layout is None:
        raise UnsupportedArchitectureError(
            f"{path} ({type(module).__name__}) holds stacked expert weights {three_d_parameters(module)} in a "
            "layout hf_prune does not know (it is neither decorated with transformers' use_experts_implementation "
            "nor listed in hf_prune.walker.experts.EXPERT_LAYOUTS); exclude it with `targets` (e.g. "
            "targets=['*attn*']) or open an issue with the model id"
        )
    first = "gate_up_proj" if layout.has_gate else "up_proj"
    projections = []
    for parameter, role in ((first, "gate_up" if layout.has_gate else "up"), ("down_proj", "down")):
        if not isinstance(getattr(module, parameter, None), nn.Parameter):
            raise UnsupportedArchitectureError(f"{path} ({type(module).__name__}) has no parameter {parameter!r}")
        bias = f"{parameter}_bias" if layout.has_bias and hasattr(module, f"{parameter}_bias") else None
        projections.append(ExpertProjection(parameter, role, bias))
    bank = ExpertBank(path, module, layout, tuple(projections))
    if hidden_size is not None:
        up_in = bank.weight(first, 0).shape[1]
        down_out = bank.weight("down_proj", 0).shape[0]
        if up_in != hidden_size or down_out != hidden_size:
            raise UnsupportedArchitectureError(
                f"{path} ({type(module).__name__}): its {first} slices read {up_in} and its down_proj slices write "
                f"{down_out} features, not the model's hidden size {hidden_size}; its layout (transposed="
                f"{layout.transposed}) does not match the weights. Exclude it with `targets` or open an issue"
            )
    return bank
