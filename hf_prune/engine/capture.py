"""Capture what each decoder layer is called with, without running any layer or the LM head.

Every decoder layer's ``forward`` is swapped, for one pass, for a recorder that returns
its input unchanged. The model then costs only its embeddings per sample, and we learn
(a) the hidden states entering layer 0 for every calibration sample and (b) the extra
arguments of each layer (masks, rotary tables, per-layer sliding windows) for a batch of
one, which broadcast to any batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..walker.layout import DecoderLayout
from .offload import execution_device


@dataclass
class LayerCall:
    """Positional arguments after the hidden states, and keyword arguments, of one layer."""

    args: tuple
    kwargs: dict[str, Any]


def move_to(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(move_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


def capture_layer_inputs(layout: DecoderLayout, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
    """Return the layer-0 hidden states ``[n, seq, hidden]`` and each layer's call arguments."""
    calls: list[LayerCall | None] = [None] * len(layout)
    first_inputs: list[torch.Tensor] = []

    def make_recorder(index: int):
        def record(*args: Any, **kwargs: Any) -> torch.Tensor:
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if index == 0:  # kept on the CPU: all samples together may not fit the device
                first_inputs.append(hidden.detach().to("cpu"))
            if calls[index] is None:
                calls[index] = LayerCall(rest, dict(kwargs))
            return hidden

        return record

    own_forwards = [layer.__dict__.get("forward") for layer in layout.layers]  # accelerate hooks live there
    for index, layer in enumerate(layout.layers):
        layer.forward = make_recorder(index)
    base = layout.model.base_model
    embeddings = layout.model.get_input_embeddings()
    device = embeddings.weight.device
    if device.type == "meta":  # offloaded by accelerate: its hook runs it on its execution device
        device = execution_device(embeddings) or torch.device("cpu")
    try:
        with torch.no_grad():
            for row in input_ids:
                base(input_ids=row.unsqueeze(0).to(device), use_cache=False)
    finally:
        for layer, forward in zip(layout.layers, own_forwards):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    if any(call is None for call in calls):
        raise RuntimeError("some decoder layers were never called during input capture; is this a decoder-only model?")
    return torch.cat(first_inputs, dim=0), calls  # type: ignore[return-value]
