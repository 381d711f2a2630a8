"""One-pass pruning of an MLP without holding all its intermediate activations at once.

With every calibration sample in one forward pass, an MLP materializes its gate, up,
activation and product tensors for all tokens together ([tokens, intermediate] each,
about 200 MB apiece for 64 x 512 tokens of SmolLM2): that is the peak memory of a
pruning run. This module runs the MLP of one decoder layer in chunks of samples instead,
without giving up one-pass pruning:

1. the MLP's input projections see the whole input first: their statistics are taken
   on it and they are pruned (they share that input);
2. each chunk runs through the MLP up to the output projection, whose input (the
   intermediate activations) is added to its statistics and kept;
3. the output projection is pruned, then applied to each chunk's kept input in turn.

Every operator still runs once per token, so the cost does not change; only one chunk's
gate/up/activation tensors are alive at a time. It applies where the MLP is a submodule
whose output is its output projection's (dropout aside, which is the identity in eval
mode); elsewhere (OPT's inline fc1/fc2, training mode) the layer runs unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .architectures import DecoderLayout, Operator
from .layer_pass import StatisticsCollector

#: Tokens per chunk: large enough to keep the matmuls efficient, small enough to save memory.
CHUNK_TOKENS = 4096


class _StopAtOutput(Exception):
    """Raised inside the output projection's pre-hook once its input was taken."""


@contextlib.contextmanager
def chunked_mlp(layout: DecoderLayout, index: int, targets: list[Operator], collector: StatisticsCollector,
                chunk_tokens: int | None = None) -> Iterator[bool]:
    """While active, layer ``index``'s MLP runs chunk by chunk as described above.

    Yields whether chunking applies to this layer. ``collector`` must be in one-pass mode
    (pruning each operator when its statistics are complete). ``chunk_tokens`` defaults to
    ``CHUNK_TOKENS``.
    """
    chunk_tokens = chunk_tokens or CHUNK_TOKENS
    spec = layout.spec
    mlp_path, _, out_name = spec.mlp_out.rpartition(".")
    layer = layout.layers[index]
    in_paths = [name.rpartition(".") for name in spec.mlp_in]
    if not mlp_path or layer.training or any(path != mlp_path for path, _, _ in in_paths):
        yield False
        return
    mlp = layout.submodule(index, mlp_path)
    output = layout.submodule(index, spec.mlp_out)
    by_local = {op.local_name: op for op in targets}
    input_ops = [by_local[name] for name in spec.mlp_in if name in by_local]
    output_op = by_local.get(spec.mlp_out)
    own_forward = mlp.__dict__.get("forward")  # accelerate keeps its hooked forward on the instance
    original_forward = mlp.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.dim() < 3 or x.shape[0] < 2:
            return original_forward(x, *args, **kwargs)
        for op in input_ops:  # the input projections' statistics are complete: prune them now
            collector.observe_and_prune(op, x)
        samples_per_chunk = max(1, chunk_tokens // math.prod(x.shape[1:-1]))
        pending: list[torch.Tensor] = []  # each chunk's input to the output projection

        def take_input(_module: nn.Module, inputs: tuple) -> None:
            h = inputs[0]
            pending.append(h)
            if output_op is not None:
                collector.observe(output_op, h, remember=False)
            raise _StopAtOutput

        handle = output.register_forward_pre_hook(take_input, prepend=True)
        try:
            for start in range(0, x.shape[0], samples_per_chunk):
                try:
                    original_forward(x[start:start + samples_per_chunk], *args, **kwargs)
                except _StopAtOutput:
                    continue
                raise RuntimeError(f"{spec.mlp_out} was not called by its MLP; cannot run the MLP in chunks")
        finally:
            handle.remove()
        if output_op is not None:
            collector.mark_ready(output_op)
        outputs = []
        while pending:  # a chunk's intermediate activations are freed as soon as they were used
            outputs.append(output(pending.pop(0)))
        return torch.cat(outputs, dim=0)

    mlp.forward = forward
    try:
        yield True
    finally:
        if own_forward is None:
            del mlp.forward
        else:
            mlp.forward = own_forward
