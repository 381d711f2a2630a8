"""Calibrating routed experts on their own tokens.

While a layer's statistics pass runs, the forward of each targeted expert bank (the
``experts`` module of a transformers 5 MoE block) is replaced by :func:`routed_forward`.
It receives what the block's router chose, as the block calls it, and for each expert
takes only the tokens routed to it: their hidden states are the input of the expert's
gate/up slice, the expert's activations on them the input of its down slice. Each slice's
statistics therefore count exactly its expert's tokens, no expert runs on a token it was
not routed to, and (in one-pass mode) each slice is pruned as soon as its statistics are
complete, before the expert's outputs go on: the pass returns the pruned layer's outputs,
as for dense layers. Experts are run one after the other, so the largest temporary is one
expert's ``[its tokens, 2 x intermediate]`` activations; the chunked pass (``chunking``)
leaves MoE blocks alone.

``gate_weighting``: a token's contribution to the block's output is its expert output
times the router's gate value ``g``, so the error an expert's pruning adds to that token is
scaled by ``g`` too. With weighting on, each token's input row is multiplied by ``g`` before
it enters the statistics (Gram matrices and Wanda norms then weight the token by ``g²``),
so that rarely-chosen, low-gate tokens count less. Llama 4's experts get inputs already
multiplied by their gate, which is what their statistics see either way.

``on_output``, when given, sees each expert's output on its routed tokens before the gate is
applied: ``on_output(module, expert, gates, output)`` with the gate values of those tokens
(``None`` for Llama 4, whose inputs already carry them). Expert pruning (``methods.experts``)
scores experts from it.

Experts that receive no token in a batch are marked ready at the end of the call with
what they have (possibly nothing); the pruner falls back to a data-free rule for experts
below its token floor (``LayerPruner.prune_in_place``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..walker.experts import ExpertBank
from ..walker.layout import Operator

#: Names the routing arguments of an experts forward go by, by position.
_INDEX_NAMES = ("top_k_index", "router_indices", "selected_experts")
_WEIGHT_NAMES = ("top_k_weights", "routing_weights", "router_scores")


def _routing_arguments(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden_states, top_k_index, top_k_weights)`` of an experts call, by position or name."""
    values = list(args)
    if len(values) < 1:
        values.append(kwargs["hidden_states"])
    if len(values) < 2:
        values.append(next(kwargs[n] for n in _INDEX_NAMES if n in kwargs))
    if len(values) < 3:
        values.append(next(kwargs[n] for n in _WEIGHT_NAMES if n in kwargs))
    return values[0], values[1], values[2]


#: ``on_output(experts module, expert, gate values or None, expert output before the gate)``
ExpertOutputObserver = Callable[[torch.nn.Module, int, "torch.Tensor | None", torch.Tensor], None]


def routed_forward(bank: ExpertBank, ops: list[Operator], observe: Callable[[Operator, torch.Tensor], None],
                   ready: Callable[[Operator], None], gate_weighting: bool,
                   on_output: ExpertOutputObserver | None = None) -> Callable[..., torch.Tensor]:
    """A forward for ``bank`` that runs each expert on its routed tokens only, calling
    ``observe(op, input)`` and then ``ready(op)`` for each of the expert's targeted slices
    (``ops``) before the slice is used; slices whose expert got no token are made ready last.
    ``on_output`` (optional) sees every expert's output on its tokens, with their gate values."""
    by_slice = {(op.parameter, op.expert): op for op in ops}
    first = bank.projections[0].parameter
    down = next(p.parameter for p in bank.projections if p.role == "down")

    def take(op: Operator | None, x: torch.Tensor, scale: torch.Tensor | None) -> None:
        if op is not None:
            observe(op, x * scale if scale is not None else x)
            ready(op)

    def run_expert(expert: int, x: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        scale = gates.unsqueeze(-1).to(x.dtype) if gate_weighting and gates is not None else None
        take(by_slice.get((first, expert)), x, scale)
        h = bank.activations(expert, x)
        take(by_slice.get((down, expert)), h, scale)
        y = bank.output(expert, h)
        if on_output is not None:
            on_output(bank.module, expert, gates, y)
        return y

    def finish() -> None:
        for op in ops:
            ready(op)  # a no-op for slices already made ready

    def top_k_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        hidden, index, weights = _routing_arguments(args, kwargs)
        out = torch.zeros_like(hidden)
        with torch.no_grad():
            for expert in range(bank.num_experts):
                token, slot = torch.where(index == expert)
                if token.numel() == 0:
                    continue
                gates = weights[token, slot]
                y = run_expert(expert, hidden[token], gates)
                out.index_put_((token,), (y * gates.unsqueeze(-1).to(y.dtype)).to(out.dtype), accumulate=True)
        finish()
        return out

    def prescaled_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        per_expert = hidden.view(bank.num_experts, -1, hidden.shape[-1])
        out = torch.zeros_like(per_expert)
        with torch.no_grad():
            for expert in range(bank.num_experts):
                token = per_expert[expert].ne(0).any(dim=-1).nonzero().squeeze(-1)  # gate 0: not routed here
                if token.numel():
                    out[expert, token] = run_expert(expert, per_expert[expert, token], None).to(out.dtype)
        finish()
        return out.view(-1, hidden.shape[-1])

    return prescaled_forward if bank.layout.routing == "prescaled" else top_k_forward


def expert_calibration_record(targets: list[list[Operator]], expert_tokens: dict[str, int],
                              fallbacks: set[str], token_floor: int, gate_weighting: bool) -> dict[str, Any] | None:
    """The ``experts`` entry of the pruning record: per expert bank (full module name), the
    calibration tokens of each expert (``None`` for experts not targeted or pruned without
    data) and the experts pruned by the data-free fallback. ``None`` for a model without
    targeted expert weights."""
    banks: dict[str, dict[str, Any]] = {}
    for ops in targets:
        for op in ops:
            if op.expert is None:
                continue
            entry = banks.setdefault(op.module_name, {"tokens": [None] * op.parameter_tensor().shape[0],
                                                      "fallback": set()})
            if op.name in expert_tokens:
                entry["tokens"][op.expert] = max(entry["tokens"][op.expert] or 0, expert_tokens[op.name])
            if op.name in fallbacks:
                entry["fallback"].add(op.expert)
    if not banks:
        return None
    return {
        "token_floor": token_floor,
        "gate_weighting": gate_weighting,
        "fallback_rule": "magnitude",
        "uses_statistics": bool(expert_tokens),
        "banks": {name: {"tokens": entry["tokens"], "fallback": sorted(entry["fallback"])}
                  for name, entry in banks.items()},
    }
