"""Running calibration hidden states through one decoder layer, batch by batch, and checking them;
running the whole model with some decoder layers bypassed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..errors import NonFiniteActivationError
from .capture import LayerCall
from .offload import execution_device


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


@contextmanager
def bypassed_layers(layers: nn.ModuleList, indices: Iterable[int]) -> Iterator[None]:
    """Within the block, the decoder layers ``indices`` hand their input on unchanged (they still run).

    A forward hook replaces each such layer's output (or the first element of its output tuple)
    by its hidden-states input, so the model behaves as if the layer were removed.
    """

    def bypass(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [layers[i].register_forward_hook(bypass, with_kwargs=True) for i in indices]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def model_logits(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor,
                 skip: Iterable[int] = ()) -> torch.Tensor:
    """The model's fp32 logits for ``input_ids`` ([batch, seq]) with the decoder layers ``skip`` bypassed.

    Runs the whole model where it is placed (accelerate moves offloaded layers in as usual);
    the logits come back on the CPU.
    """
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    if device.type == "meta":
        device = execution_device(embeddings) or torch.device("cpu")
    with torch.no_grad(), bypassed_layers(layers, skip):
        logits = model(input_ids=input_ids.to(device), use_cache=False).logits
    return logits.float().cpu()
