"""One-pass pruning of a layer's attention and MLP blocks, run in chunks of samples.

With every calibration sample in one forward pass, a block materializes its intermediate
tensors for all tokens together (an MLP's gate, up, activation and product tensors are
[tokens, intermediate] each, about 200 MB apiece for 64 x 512 tokens of SmolLM2; the
attention's queries and rotary temporaries are [tokens, heads x head_dim]). That sets the
peak memory of a pruning run, and on the CPU every such tensor is a fresh mapping whose
pages are faulted in on first use. This module runs each block in chunks of samples
instead, without giving up one-pass pruning:

1. the block's input projections (q/k/v, gate/up) see the whole input first: their
   statistics are taken on it and they are pruned (they share that input);
2. each chunk runs through the block up to its output projection, whose input (attention
   output, MLP intermediate activations) is added to its statistics and kept;
3. the output projection is pruned, then applied to each chunk's kept input in turn.

Every operator still runs once per token, so the work does not change. Only one chunk's
temporaries are alive at a time, and on the CPU they are small enough to be served from
the heap (``heap_for_temporaries``) instead of fresh mappings. A block is chunked where it
is a submodule holding its input and output projections, whose output is the output
projection's (dropout aside, the identity in eval mode; checked on one sample before the
block is chunked), and whose other arguments can be split by sample (no KV cache);
elsewhere (OPT's inline fc1/fc2, Falcon-H1's scaled MLP output, training mode, mixture-of-
experts blocks, which ``engine.experts`` runs expert by expert) the block runs unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..walker.layout import ArchitectureSpec, DecoderLayout, Operator
from .collector import StatisticsCollector
from .forward import StopForward, UntilStopped
from .host_memory import heap_for_temporaries

#: Most tokens per chunk: enough to keep the matmuls efficient, few enough to save memory.
CHUNK_TOKENS = 4096
#: On the CPU, a chunk's widest temporary stays within this (whole samples, at least one), well
#: below the heap's mmap threshold so that it reuses heap memory. Small chunks also stay in
#: cache: for SmolLM2, one sample per MLP chunk was as fast as eight and peaked 100 MB lower.
CPU_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class Block:
    """A submodule of a decoder layer that starts with ``inputs`` and ends with ``output``."""

    path: str
    inputs: tuple[str, ...]
    output: str
    returns_tuple: bool  # attention returns (output, weights); an MLP returns its output


def chunkable_blocks(spec: ArchitectureSpec) -> list[Block]:
    """The attention and MLP blocks of a family whose projections all sit in one submodule."""
    attention_in = (spec.qkv,) if spec.qkv else tuple(name for name in (spec.q, spec.k, spec.v) if name)
    candidates = [(attention_in, spec.o, True), (spec.mlp_in, spec.mlp_out, False)]
    blocks = []
    for inputs, output, returns_tuple in candidates:
        if output is None:
            continue
        path = output.rpartition(".")[0]
        if path and inputs and all(name.rpartition(".")[0] == path for name in inputs):
            blocks.append(Block(path, inputs, output, returns_tuple))
    return blocks


def _splittable(value: Any) -> bool:
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_splittable(item) for item in value)
    return False  # a KV cache or another stateful object: the block runs whole


def _take_samples(value: Any, samples: int, start: int, end: int) -> Any:
    """Samples ``start:end`` of every tensor in ``value`` that holds one row per sample."""
    if isinstance(value, torch.Tensor):
        return value[start:end] if value.dim() >= 2 and value.shape[0] == samples else value
    if isinstance(value, (tuple, list)):
        return type(value)(_take_samples(item, samples, start, end) for item in value)
    if isinstance(value, dict):
        return {key: _take_samples(item, samples, start, end) for key, item in value.items()}
    return value


def _widest_per_token(layout: DecoderLayout, index: int, block: Block) -> int:
    """Elements per token of the block's widest intermediate tensor."""
    def operator(name: str) -> Operator:
        return Operator(name, name, index, layout.submodule(index, name))

    return max([operator(name).out_features for name in block.inputs] + [operator(block.output).in_features])


def _chunkable_input(x: Any) -> bool:
    """A [samples, tokens..., width] tensor with more than one sample."""
    return isinstance(x, torch.Tensor) and x.dim() >= 3 and x.shape[0] >= 2


def _samples_per_chunk(x: torch.Tensor, width: int, element_bytes: int, most_tokens: int) -> int:
    """Whole samples of ``x`` per chunk: at most ``most_tokens`` tokens and, on the CPU, a
    ``width``-wide temporary of at most ``CPU_CHUNK_BYTES``; at least one sample."""
    if x.device.type == "cpu":
        most_tokens = min(most_tokens, CPU_CHUNK_BYTES // (width * element_bytes))
    return max(1, most_tokens // math.prod(x.shape[1:-1]))


def dense_pass_samples(layout: DecoderLayout, hidden: torch.Tensor) -> int:
    """Samples per forward for a layer pass that prunes nothing inside it (statistics of the dense layer, then
    the pruned layer's outputs): on the CPU, as many whole samples as keep layer 0's widest block temporary
    within ``CPU_CHUNK_BYTES`` (at least one), so the pass reuses heap memory as the chunked one-pass blocks do;
    elsewhere every sample. The statistics are sums over samples, so this changes only the order of the sums."""
    if hidden.device.type != "cpu" or hidden.dim() < 3:
        return hidden.shape[0]
    widths = [_widest_per_token(layout, 0, block) for block in chunkable_blocks(layout.layer_spec(0))]
    width = max(widths, default=hidden.shape[-1])
    return min(hidden.shape[0], _samples_per_chunk(hidden, width, hidden.element_size(), CHUNK_TOKENS))


@contextlib.contextmanager
def chunked_blocks(layout: DecoderLayout, index: int, targets: list[Operator],
                   collector: StatisticsCollector) -> Iterator[None]:
    """While active, layer ``index``'s attention and MLP blocks (and RMSNorms) run chunk by
    chunk as described above. ``collector`` must be in one-pass mode (pruning each operator
    when its statistics are complete)."""
    layer = layout.layers[index]
    patched: list[tuple[nn.Module, Any]] = []
    if not layer.training:
        by_local = {op.local_name: op for op in targets}
        for block in chunkable_blocks(layout.layer_spec(index)):
            module = layout.submodule(index, block.path)
            patched.append((module, module.__dict__.get("forward")))  # accelerate keeps its hook on the instance
            module.forward = _chunked_forward(
                module.forward, layout.submodule(index, block.output), block,
                [by_local[name] for name in block.inputs if name in by_local], by_local.get(block.output),
                collector, _widest_per_token(layout, index, block),
            )
        for norm in layer.children():
            if type(norm).__name__.endswith("RMSNorm"):
                patched.append((norm, norm.__dict__.get("forward")))
                norm.forward = _chunked_norm(norm.forward)
    try:
        yield
    finally:
        for module, own_forward in patched:
            if own_forward is None:
                del module.forward
            else:
                module.forward = own_forward


def _chunked_norm(original_forward):
    """A per-token RMSNorm on CPU, chunk by chunk: its float32 temporaries (square, scaled,
    weighted) come from the heap and stay in cache; only the output is full size."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        x = args[0] if len(args) == 1 and not kwargs else None
        if not _chunkable_input(x) or x.device.type != "cpu":
            return original_forward(*args, **kwargs)
        samples_per_chunk = _samples_per_chunk(x, x.shape[-1], 4, x.shape[:-1].numel())  # float32 temporaries
        with heap_for_temporaries():
            first = original_forward(x[:samples_per_chunk])
            result = first.new_empty((x.shape[0], *first.shape[1:]))
            result[:samples_per_chunk] = first
            del first
            for start in range(samples_per_chunk, x.shape[0], samples_per_chunk):
                result[start:start + samples_per_chunk] = original_forward(x[start:start + samples_per_chunk])
        return result

    return forward


class _Probe:
    """Catches the output projection's output during a probe."""

    def __init__(self) -> None:
        self.output: torch.Tensor | None = None

    def __call__(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        self.output = output


def _returns_output_projection(original_forward, output: nn.Module, block: Block, collector: StatisticsCollector,
                               args: tuple, kwargs: dict, samples: int) -> bool:
    """Whether the block returns its output projection's output as it is (``(out, None)`` for attention):
    the block runs on one sample with the statistics hooks paused. A block that scales or adds to it
    (Falcon-H1's MLP multipliers, say) runs whole instead of in chunks."""
    probe = _Probe()
    handle = output.register_forward_hook(probe)
    try:
        with collector.paused():
            result = original_forward(*_take_samples(args, samples, 0, 1), **_take_samples(kwargs, samples, 0, 1))
    finally:
        handle.remove()
    if block.returns_tuple:
        if not isinstance(result, tuple) or len(result) != 2:
            return False
        result = result[0]
    return (probe.output is not None and isinstance(result, torch.Tensor)
            and (result is probe.output or torch.equal(result, probe.output)))


def _chunked_forward(original_forward, output: nn.Module, block: Block, input_ops: list[Operator],
                     output_op: Operator | None, collector: StatisticsCollector, widest_per_token: int):
    def forward(*args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs.get("hidden_states")
        if (not _chunkable_input(x) or kwargs.get("output_attentions")
                or not _splittable((args, tuple(kwargs.values())))):
            return original_forward(*args, **kwargs)
        samples = x.shape[0]
        samples_per_chunk = _samples_per_chunk(x, widest_per_token, x.element_size(), CHUNK_TOKENS)
        pending: list[torch.Tensor] = []  # each chunk's input to the output projection

        def take_input(_module: nn.Module, inputs: tuple) -> None:
            pending.append(inputs[0])
            if output_op is not None:
                collector.observe(output_op, inputs[0], remember=False)
            raise StopForward

        # pruning runs outside the heap regions: a solver's temporaries of a few MiB must not
        # land on top of the kept chunks, where they would stay resident until the next trim
        for op in input_ops:  # the input projections' statistics are complete: prune them now
            collector.observe_and_prune(op, x)
        if not _returns_output_projection(original_forward, output, block, collector, args, kwargs, samples):
            return original_forward(*args, **kwargs)  # the output projection's hook takes the whole input
        handle = output.register_forward_pre_hook(take_input, prepend=True)
        try:
            with heap_for_temporaries():
                for start in range(0, samples, samples_per_chunk):
                    end = start + samples_per_chunk
                    with UntilStopped() as stop:
                        original_forward(*_take_samples(args, samples, start, end),
                                         **_take_samples(kwargs, samples, start, end))
                    if not stop.reached:
                        raise RuntimeError(f"{block.output} was not called by {block.path}; cannot run it in chunks")
        finally:
            handle.remove()
        if output_op is not None:
            collector.mark_ready(output_op)
        outputs = []
        with heap_for_temporaries():
            while pending:  # a chunk's intermediate activations are freed as soon as they were used
                outputs.append(output(pending.pop(0)))
        result = torch.cat(outputs, dim=0)
        return (result, None) if block.returns_tuple else result

    return forward
