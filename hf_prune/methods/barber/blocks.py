"""The blocks LLM-Barber rebuilds: a decoder layer's self-attention and its MLP.

A block is a submodule that maps its input to the output added to the residual stream.
Its input in the pruned model is caught with a forward pre-hook on the block while the
decoder layer runs on a few calibration samples; the layer's forward stops there, so
catching the attention input costs a layer norm and catching the MLP input costs the
attention. The block is then run again, outside the layer, with any weights swapped in
(``torch.func.functional_call``): dense and pruned weights without a second copy of the
module, and in float32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...engine.capture import LayerCall
from ...engine.forward import StopForward, UntilStopped
from ...walker.layout import DecoderLayout, Operator


class _FeedForward(nn.Module):
    """``fc_out(activation(fc_in(x)))`` for families whose MLP is not a submodule (OPT)."""

    def __init__(self, fc_in: nn.Module, activation: nn.Module, fc_out: nn.Module) -> None:
        super().__init__()
        self.fc_in = fc_in
        self.activation = activation
        self.fc_out = fc_out

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.activation(self.fc_in(hidden)))


@dataclass
class Block:
    """One block of a decoder layer and the targeted operators inside it.

    ``module`` computes the block; ``entry`` is the module whose input is the block's input
    (``module`` itself, or the first projection of a ``_FeedForward``); ``weight_names``
    maps each operator's full name to its weight's name inside ``module``.
    """

    name: str
    module: nn.Module | None  # None for the "other" operators of the exact swaps (see decoder_blocks)
    entry: nn.Module | None
    operators: list[Operator]
    weight_names: dict[str, str]


@dataclass
class BlockCall:
    """The block's input for a few samples and the other arguments the layer passed it."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]
    hidden_key: str | None  # keyword that carried the input, None when it came first positionally
    samples: int  # calibration samples behind this call

    def float32(self) -> BlockCall:
        """The same call with every floating tensor in float32."""
        return BlockCall(to_float32(self.hidden), to_float32(self.args), to_float32(self.kwargs), self.hidden_key,
                         self.samples)


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def decoder_blocks(layout: DecoderLayout, index: int, targets: list[Operator],
                   allow_stray: bool = False) -> list[Block]:
    """The self-attention block then the MLP block of layer ``index``, each with its targeted operators.

    Blocks without targeted operators are left out. Raises if a targeted operator lies in
    neither block, since its mask could not be rebuilt; with ``allow_stray`` (the exact swaps,
    which rebuild operator by operator) such operators form a last block ``"other"`` with no module.
    """
    spec = layout.layer_spec(index)  # a layer may lack either block (MoE: no dense MLP; Mamba: no attention)
    layer = layout.layers[index]
    blocks: list[Block] = []
    if spec.o is not None:
        attention_path = _parent(spec.o)
        if not attention_path:
            raise ValueError(f"{layout.model_type}: the attention output projection {spec.o!r} is not inside a "
                             "submodule")
        attention = layout.submodule(index, attention_path)
        blocks.append(_block("attention", attention, attention, attention_path, targets))
    mlp_path = _parent(spec.mlp_out) if spec.mlp_out is not None else None
    if mlp_path:
        mlp = layout.submodule(index, mlp_path)
        blocks.append(_block("mlp", mlp, mlp, mlp_path, targets))
    elif spec.mlp_out is not None:
        if len(spec.mlp_in) != 1 or not isinstance(getattr(layer, "activation_fn", None), nn.Module):
            raise ValueError(f"{layout.model_type}: cannot assemble the MLP block of its decoder layers")
        fc_in = layout.submodule(index, spec.mlp_in[0])
        fc_out = layout.submodule(index, spec.mlp_out)
        module = _FeedForward(fc_in, layer.activation_fn, fc_out)
        names = {spec.mlp_in[0]: "fc_in.weight", spec.mlp_out: "fc_out.weight"}
        ops = [op for op in targets if op.local_name in names]
        blocks.append(Block("mlp", module, fc_in, ops, {op.name: names[op.local_name] for op in ops}))
    covered = {op.name for block in blocks for op in block.operators}
    stray = [op.name for op in targets if op.name not in covered]
    if stray and allow_stray:
        blocks.append(Block("other", None, None, [op for op in targets if op.name not in covered], {}))
    elif stray:
        raise ValueError(
            f"LLM-Barber rebuilds masks inside the self-attention and MLP blocks only, but {stray} lie outside "
            "them; leave these modules out with `targets`"
        )
    return [block for block in blocks if block.operators]


def _block(name: str, module: nn.Module, entry: nn.Module, path: str, targets: list[Operator]) -> Block:
    prefix = path + "."
    ops = [op for op in targets if op.local_name.startswith(prefix)]
    return Block(name, module, entry, ops, {op.name: op.local_name[len(prefix):] + ".weight" for op in ops})


def block_calls(layer: nn.Module, block: Block, hidden: torch.Tensor, call: LayerCall,
                chunk: int) -> Iterator[BlockCall]:
    """The block's inputs in the current (pruned) layer, ``chunk`` calibration samples at a time.

    The layer runs only up to the block on each chunk; nothing beyond one chunk is kept.
    """
    caught: list[BlockCall] = []
    armed = False
    samples = 0

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not armed:
            return
        if args:
            caught.append(BlockCall(args[0], tuple(args[1:]), dict(kwargs), None, samples))
        else:
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            rest = {k: v for k, v in kwargs.items() if k != key}
            caught.append(BlockCall(kwargs[key], (), rest, key, samples))
        raise StopForward

    handle = block.entry.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, hidden.shape[0], chunk):
            batch = hidden[start:start + chunk]
            armed, samples = True, batch.shape[0]
            try:
                with UntilStopped(), torch.no_grad():
                    layer(batch, *call.args, **call.kwargs)
            finally:
                armed = False
            if not caught:
                raise RuntimeError(f"the {block.name} block was never called in its decoder layer's forward pass")
            yield caught.pop()
    finally:
        handle.remove()


def to_float32(value: Any) -> Any:
    """``value`` with every floating tensor inside (tuples, lists, dicts) in float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    return value


def float32_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module``, detached and in float32 (no copy when already)."""
    state = {name: p.detach() for name, p in module.named_parameters()}
    state.update({name: b for name, b in module.named_buffers()})
    return {name: (t.float() if t.is_floating_point() else t) for name, t in state.items()}


def run_block(block: Block, state: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
              call: BlockCall) -> torch.Tensor:
    """The block's output on ``call`` with ``weights`` (operator name -> ``(out, in)`` weight) swapped in.

    ``state`` supplies every other parameter (see ``float32_state``); ``call`` should hold
    float32 tensors so that the whole block runs, and is differentiated, in float32.
    """
    params = dict(state)
    for op in block.operators:
        weight = weights[op.name]
        params[block.weight_names[op.name]] = weight.t() if op.transposed else weight
    args, kwargs = call.args, call.kwargs
    if call.hidden_key is None:
        args = (call.hidden, *args)
    else:
        kwargs = {**kwargs, call.hidden_key: call.hidden}
    out = torch.func.functional_call(block.module, params, args, kwargs)
    return out[0] if isinstance(out, tuple) else out
