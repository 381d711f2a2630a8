"""Modules left with nothing to compute: an attention without heads, a Conv1D without inputs.

PyTorch's ``Linear`` already handles zero-width inputs and outputs, but a family's
attention reshapes its projections into ``(-1, head_dim)`` heads, which fails on an empty
tensor, and GPT-2's ``Conv1D`` views its input as ``(-1, width)``. These modules get a
subclass (same name, same parameters, same state-dict keys) whose forward returns what the
empty computation equals: the output projection's bias, or zeros.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

_SWAPPED: dict[tuple[type, type], type] = {}


def swap_class(module: nn.Module, mixin: type) -> None:
    """Make ``module`` an instance of a subclass of its class that puts ``mixin`` first."""
    base = type(module)
    if isinstance(module, mixin):
        return
    key = (base, mixin)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(base.__name__, (mixin, base), {"__module__": base.__module__,
                                                            "__qualname__": base.__qualname__})
    module.__class__ = _SWAPPED[key]


def _bias_output(module: nn.Module, leading: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """What a projection with zero input width returns: its bias (or zeros) for every position."""
    out_features = module.nf if isinstance(module, Conv1D) else module.out_features
    out = like.new_zeros(*leading, out_features)
    bias = getattr(module, "bias", None)
    return out + bias.to(out.dtype) if bias is not None else out


class EmptyInputConv1D(nn.Module):
    """Mixin for a GPT-2 ``Conv1D`` whose input width is 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _bias_output(self, x.shape[:-1], x)


class HeadlessAttention(nn.Module):
    """Mixin for a self-attention left with no heads: its output is the output projection's bias.

    The input projections are still called (their outputs are empty) so that hooks on them
    see the call, and a key/value cache still records the sequence length through empty
    key and value tensors.
    """

    _hf_prune_inputs: tuple[str, ...] = ()
    _hf_prune_output: str = ""
    _hf_prune_head_dim: int = 1

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        for name in self._hf_prune_inputs:
            self.get_submodule(name)(hidden_states)
        output_proj = self.get_submodule(self._hf_prune_output)
        empty = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        output = output_proj(empty)
        cache = next((kwargs[k] for k in ("past_key_values", "layer_past", "past_key_value")
                      if kwargs.get(k) is not None), None)
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)
            batch, length = hidden_states.shape[0], hidden_states.shape[1]
            keys = hidden_states.new_zeros(batch, 0, length, self._hf_prune_head_dim)
            cache.update(keys, keys.clone(), self.layer_idx)
        return output, None


def mark_headless(attention: nn.Module, inputs: tuple[str, ...], output: str, head_dim: int) -> None:
    """Turn ``attention`` (already shrunk to zero heads) into a ``HeadlessAttention``."""
    swap_class(attention, HeadlessAttention)
    attention._hf_prune_inputs = inputs
    attention._hf_prune_output = output
    attention._hf_prune_head_dim = head_dim


def mark_empty_input(module: nn.Module) -> None:
    """Give a ``Conv1D`` with zero input width a forward that works."""
    if isinstance(module, Conv1D):
        swap_class(module, EmptyInputConv1D)
