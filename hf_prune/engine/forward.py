"""Running calibration hidden states through one decoder layer, batch by batch, and checking them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.utils import logging

from ..errors import NonFiniteActivationError
from .capture import LayerCall


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall, batch_size: int,
              on_batch_end: Callable[[], None] | None = None) -> torch.Tensor:
    """Outputs of ``layer`` for ``hidden`` ([n, seq, dim]), ``batch_size`` samples at a time.

    Hidden states kept off the layer's device (calibration activations offloaded to the
    CPU) are moved there one batch at a time, and the outputs come back beside them.
    """
    outputs = []
    on_device = next((p.device for p in layer.parameters() if p.device.type != "meta"), hidden.device)
    starts = range(0, hidden.shape[0], batch_size)
    if len(starts) > 1:
        starts = logging.tqdm(starts, desc="Calibration batches", unit="batch", leave=False)
    with torch.no_grad():
        for start in starts:
            out = layer(hidden[start:start + batch_size].to(on_device), *call.args, **call.kwargs)
            outputs.append((out[0] if isinstance(out, tuple) else out).to(hidden.device))
            if on_batch_end is not None:
                on_batch_end()
    return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]


def check_finite(tensor: torch.Tensor, layer_index: int, model_dtype: torch.dtype) -> None:
    """Raise a clear error when a layer's outputs hold NaN or Inf."""
    # a finite sum proves every entry finite (NaN and Inf propagate) at a fraction of the
    # cost of isfinite(); only an overflowing sum needs the entry-wise check
    if torch.isfinite(tensor.sum(dtype=torch.float32)) or torch.isfinite(tensor).all():
        return
    raise NonFiniteActivationError(
        f"decoder layer {layer_index} produced NaN/Inf on the calibration data (model dtype {model_dtype}). "
        "Load the model in float32 or bfloat16 (dtype=torch.float32), lower the sparsity, or check the "
        "calibration text. Nothing was saved"
    )


class StopForward(Exception):
    """Raised inside a forward hook to end the pass early once what was wanted is known."""


class UntilStopped:
    """Context for a forward pass that a hook may end early by raising ``StopForward``.

    The exception ends the body silently and ``reached`` becomes True; any other exception
    propagates. ``with UntilStopped() as stop: layer(x)`` then ``stop.reached`` tells whether
    a hook fired.
    """

    def __init__(self) -> None:
        self.reached = False

    def __enter__(self) -> UntilStopped:
        self.reached = False
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: object) -> bool:
        if exc_type is not None and issubclass(exc_type, StopForward):
            self.reached = True
            return True
        return False
