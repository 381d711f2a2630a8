"""Capture what each decoder layer is called with, without running any layer or the LM head.

Every decoder layer's ``forward`` is swapped, for one pass, for a recorder that returns
its input unchanged (as a tensor, or a one-element tuple for models that index their layers'
outputs). The model then costs only its embeddings per sample, and we learn
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


class _ContainerMismatch(Exception):
    """The model does not hand a layer's output on as the recorder returned it."""


def capture_layer_inputs(layout: DecoderLayout, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
    """Return the layer-0 hidden states ``[n, seq, hidden]`` and each layer's call arguments.

    The recorders first return the hidden states as a tensor. A model that takes its layers'
    outputs apart (Falcon-H1 reads ``layer_outputs[0]``) then hands the next layer something
    of another shape; the capture starts again with recorders that return a one-element tuple.
    """
    try:
        return _capture(layout, input_ids, as_tuple=False)
    except _ContainerMismatch:
        pass
    try:
        return _capture(layout, input_ids, as_tuple=True)
    except _ContainerMismatch:
        raise RuntimeError("the model changes what one decoder layer returns before the next layer gets it, both as "
                           "a tensor and as a tuple; its layers' inputs cannot be captured") from None


def _capture(layout: DecoderLayout, input_ids: torch.Tensor, as_tuple: bool
             ) -> tuple[torch.Tensor, list[LayerCall]]:
    calls: list[LayerCall | None] = [None] * len(layout)
    first_inputs: list[torch.Tensor] = []
    handed_on: list[torch.Tensor | None] = [None]  # the hidden states the last recorder returned, this sample

    def make_recorder(index: int):
        def record(*args: Any, **kwargs: Any) -> Any:
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            previous = handed_on[0]
            if previous is not None and (not isinstance(hidden, torch.Tensor) or hidden.shape != previous.shape):
                raise _ContainerMismatch
            if index == 0:  # kept on the CPU: all samples together may not fit the device
                first_inputs.append(hidden.detach().to("cpu"))
            if calls[index] is None:
                calls[index] = LayerCall(rest, dict(kwargs))
            handed_on[0] = hidden
            return (hidden,) if as_tuple else hidden

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
                handed_on[0] = None
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
