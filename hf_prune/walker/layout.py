"""The layer walker: where each decoder-only family keeps its layers and operators.

Pruning only ever touches the Linear (and GPT-2 ``Conv1D``) operators inside decoder
layers, seen as ``(out_features, in_features)`` weights whatever their storage layout.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchitectureSpec:
    """Names inside one family's decoder layer.

    ``mlp_in`` are the projections whose output rows are MLP neurons; ``mlp_out`` consumes
    them as input columns. ``fused_gate_up`` marks a single projection holding the gate
    rows then the up rows. Attention: separate ``q/k/v`` or one fused ``qkv`` projection
    (``qkv_layout`` "blocks": [q; k; v]; "per_head": heads interleaved as [q_h, k_h, v_h]).
    """

    layers_path: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    fused_gate_up: bool = False
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    qkv_layout: str = "blocks"
    o: str = ""


_LLAMA_LIKE = ArchitectureSpec(
    layers_path="model.layers",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": ArchitectureSpec(
        layers_path="model.layers",
        mlp_in=("mlp.gate_up_proj",),
        mlp_out="mlp.down_proj",
        fused_gate_up=True,
        qkv="self_attn.qkv_proj",
        o="self_attn.o_proj",
    ),
    "opt": ArchitectureSpec(
        layers_path="model.decoder.layers",
        mlp_in=("fc1",),
        mlp_out="fc2",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
    ),
    "gpt2": ArchitectureSpec(
        layers_path="transformer.h",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        qkv="attn.c_attn",
        o="attn.c_proj",
    ),
    "gpt_neox": ArchitectureSpec(
        layers_path="gpt_neox.layers",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        qkv="attention.query_key_value",
        qkv_layout="per_head",
        o="attention.dense",
    ),
}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)




@dataclass
class Operator:
    """One prunable weight inside a decoder layer, seen as ``(out, in)``."""

    name: str
    local_name: str
    layer_index: int
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return isinstance(self.module, Conv1D)

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0 if self.transposed else 1]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[1 if self.transposed else 0]

    def read_weight(self) -> torch.Tensor:
        """The weight as ``(out, in)``; a view for Linear, a transposed view for Conv1D."""
        weight = self.module.weight.data
        return weight.t() if self.transposed else weight

    def write_weight(self, new_weight: torch.Tensor) -> None:
        """Copy an ``(out, in)`` weight back, in the module's dtype and layout."""
        target = self.module.weight.data
        source = new_weight.t() if self.transposed else new_weight
        target.copy_(source.to(dtype=target.dtype, device=target.device))


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    node: object = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node if isinstance(node, nn.Module) else None


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/accelerate wrappers and a peft ``PeftModel``."""
    for _ in range(8):  # a few nested wrappers at most
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft PeftModel
            model = model.get_base_model()
        elif not hasattr(model, "config") and isinstance(getattr(model, "module", None), nn.Module):  # DDP
            model = model.module
        else:
            break
    return model


def _adapter_prefixes(layer: nn.Module) -> list[str]:
    """Names of the adapter containers (``lora_A``, ``lora_B``...) of peft tuner layers in ``layer``."""
    prefixes = []
    for name, module in layer.named_modules():
        adapter_names = getattr(module, "adapter_layer_names", None)
        if adapter_names and hasattr(module, "base_layer"):
            prefixes += [f"{name}.{attr}" if name else attr for attr in adapter_names]
    return prefixes


def decoder_operators(model: nn.Module) -> Iterator[Operator]:
    """Every prunable operator of every decoder layer of a (possibly wrapped) model, as named in
    the pruning record: the one walk that reports, record checks, masks and LoRA merges use."""
    layout = DecoderLayout(unwrap_model(model))
    for index in range(len(layout)):
        yield from layout.operators(index)


class DecoderLayout:
    """Finds a causal LM's decoder layers and the operators inside them."""

    def __init__(self, model: PreTrainedModel) -> None:
        model_type = getattr(model.config, "model_type", None)
        spec = ARCHITECTURES.get(model_type)
        if spec is None:
            raise UnsupportedArchitectureError(
                f"hf_prune does not know the architecture {model_type!r} "
                f"({type(model).__name__}). Supported model types: {', '.join(supported_model_types())}. "
                "Open an issue with the model id to have it added."
            )
        layers = _get_path(model, spec.layers_path)
        if not isinstance(layers, nn.ModuleList):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} ({model_type}) has no decoder layers at "
                f"'{spec.layers_path}'; pass a causal LM (AutoModelForCausalLM) of a supported type"
            )
        self.model = model
        self.model_type = model_type
        self.spec = spec
        self.layers = layers

    def __len__(self) -> int:
        return len(self.layers)

    def layer_prefix(self, index: int) -> str:
        return f"{self.spec.layers_path}.{index}"

    def operators(self, index: int) -> list[Operator]:
        """Every prunable operator of layer ``index``, in module order.

        Works through peft: a LoRA-wrapped ``q_proj`` yields its ``base_layer`` under the name
        ``...self_attn.q_proj``; the adapter's own ``lora_A``/``lora_B`` are not operators.
        """
        prefix = self.layer_prefix(index)
        layer = self.layers[index]
        skip = _adapter_prefixes(layer)
        found = []
        for local, module in layer.named_modules():
            if not local or not is_prunable(module):
                continue
            if any(local == p or local.startswith(p + ".") for p in skip):
                continue
            clean = ".".join(part for part in local.split(".") if part != "base_layer")
            found.append(Operator(f"{prefix}.{clean}", clean, index, module))
        return found

    def targeted_operators(self, index: int, targets: list[str] | None) -> list[Operator]:
        """The operators of layer ``index`` whose full or layer-relative name matches ``targets``."""
        ops = self.operators(index)
        if targets is None:
            return ops
        return [
            op for op in ops
            if any(fnmatch.fnmatchcase(op.name, t) or fnmatch.fnmatchcase(op.local_name, t) for t in targets)
        ]

    def all_targeted(self, targets: list[str] | None) -> list[list[Operator]]:
        """Targeted operators per layer; raises when ``targets`` matches nothing at all."""
        per_layer = [self.targeted_operators(i, targets) for i in range(len(self))]
        if not any(per_layer):
            example = ", ".join(op.local_name for op in self.operators(0)) if len(self) else "none"
            raise ValueError(
                f"targets {targets!r} match no Linear inside the decoder layers. Patterns are globs on "
                f"full names ('{self.layer_prefix(0)}.mlp.*') or layer-relative names; this model's "
                f"layer operators are: {example}"
            )
        return per_layer

    def submodule(self, index: int, local_name: str) -> nn.Module:
        module = _get_path(self.layers[index], local_name)
        if module is None:
            raise KeyError(f"layer {index} has no module {local_name!r}")
        return module
