"""The layer walker: a causal LM's decoder layers and every prunable weight inside them.

The walker reads the model rather than a table of families:

* the decoder layers are found from ``_no_split_modules`` or the usual paths (``discovery``);
* inside each layer, every ``nn.Linear`` and GPT-2 ``Conv1D`` is an operator, and so is
  every expert's slice of the stacked expert weights of transformers 5 MoE blocks
  (``experts``), each seen as ``(out_features, in_features)`` whatever its storage layout;
* routers and scalar gates (``mlp.gate``, ``router``, ``shared_expert_gate``: an expert-choice
  module, a class named ``*Router``, or a 1-wide projection) are operators of kind
  ``"router"``, left alone unless ``targets`` names them explicitly;
* the MLP/attention roles structured methods need are told by projection names (``roles``).

Convolution kernels, ``A_log``, ``dt_bias``, norms, biases and embeddings are never operators.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from ..errors import UnsupportedArchitectureError
from .discovery import find_decoder_layers, get_path
from .experts import ExpertBank, looks_like_experts, read_expert_bank, three_d_parameters
from .roles import ArchitectureSpec, derive_spec

logger = logging.get_logger(__name__)

#: Families the test suite prunes, saves and reloads (``tests/tiny_models.py``); the walker
#: reads other decoder-only families the same way.
TESTED_FAMILIES = (
    "llama", "mistral", "ministral", "qwen2", "qwen3", "qwen3_5_text", "gemma", "gemma2", "gemma3_text",
    "gemma4_text", "phi3", "phi", "smollm3", "olmo2", "olmo3", "granite", "glm4", "cohere2", "starcoder2", "gpt2",
    "gpt_bigcode", "gpt_neox", "opt", "falcon", "mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3",
    "llama4_text", "qwen3_next", "granitemoehybrid", "falcon_h1",
)

#: Last name components of routers inside a mixture-of-experts block.
ROUTER_NAMES = ("gate", "router", "gating")

_GLOB_CHARS = set("*?[")


def supported_model_types() -> list[str]:
    """The model types the test suite covers; the walker also reads other decoder-only families."""
    return sorted(TESTED_FAMILIES)


@dataclass
class Operator:
    """One prunable weight inside a decoder layer, seen as ``(out, in)``.

    ``module`` owns the weight, stored as its attribute ``parameter``. For a fused expert
    weight ``expert`` is the index along the parameter's first dimension and ``name`` ends
    with it (``model.layers.3.mlp.experts.down_proj.5``); ``module_name`` is the owning
    module's full name. ``kind`` is ``"linear"`` (Linear, Conv1D), ``"expert"`` or ``"router"``.
    """

    name: str
    local_name: str
    layer_index: int
    module: nn.Module
    parameter: str = "weight"
    expert: int | None = None
    kind: str = "linear"
    stored_transposed: bool | None = None
    module_name: str = ""

    @property
    def transposed(self) -> bool:
        """Whether the weight is stored ``(in, out)`` (GPT-2 ``Conv1D``, gpt-oss/Llama 4 experts)."""
        return isinstance(self.module, Conv1D) if self.stored_transposed is None else self.stored_transposed

    @property
    def parameter_name(self) -> str:
        """Full name of the parameter holding this weight (the state-dict key)."""
        return f"{self.module_name or self.name}.{self.parameter}"

    @property
    def bank_name(self) -> str | None:
        """For an expert slice, its parameter's name without the expert index."""
        return self.name.rpartition(".")[0] if self.expert is not None else None

    def parameter_tensor(self) -> nn.Parameter:
        """The whole parameter (all experts for a fused expert weight)."""
        return getattr(self.module, self.parameter)

    def stored_weight(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """This operator's part of ``tensor`` (default its parameter's data) in storage layout."""
        data = self.parameter_tensor().data if tensor is None else tensor
        return data[self.expert] if self.expert is not None else data

    def as_out_in(self, stored: torch.Tensor) -> torch.Tensor:
        """A stored-layout tensor of this operator's shape, viewed as ``(out, in)``."""
        return stored.t() if self.transposed else stored

    @property
    def in_features(self) -> int:
        return self.stored_weight().shape[0 if self.transposed else 1]

    @property
    def out_features(self) -> int:
        return self.stored_weight().shape[1 if self.transposed else 0]

    def read_weight(self) -> torch.Tensor:
        """The weight as ``(out, in)``: a view of the stored weight."""
        return self.as_out_in(self.stored_weight())

    def write_weight(self, new_weight: torch.Tensor) -> None:
        """Copy an ``(out, in)`` weight back, in the module's dtype and layout."""
        target = self.stored_weight()
        source = new_weight.t() if self.transposed else new_weight
        target.copy_(source.to(dtype=target.dtype, device=target.device))

    def matches(self, pattern: str) -> bool:
        """Whether a ``targets`` glob names this operator (full or layer-relative name; for an
        expert slice also its parameter's name, so ``"*.down_proj"`` takes every expert's)."""
        names = [self.name, self.local_name]
        if self.expert is not None:
            names += [self.name.rpartition(".")[0], self.local_name.rpartition(".")[0]]
        return any(fnmatch.fnmatchcase(name, pattern) for name in names)


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


def _out_features(module: nn.Module) -> int:
    weight = module.weight
    return int(weight.shape[1] if isinstance(module, Conv1D) else weight.shape[0])


def _is_router(local_name: str, module: nn.Module, beside_experts: bool) -> bool:
    """A Linear-like module that routes tokens or gates a branch with one value."""
    leaf = local_name.rpartition(".")[2]
    cls = type(module).__name__
    if "Router" in cls or cls.endswith("Gate"):
        return True
    if leaf in ROUTER_NAMES and beside_experts:
        return True
    return is_prunable(module) and _out_features(module) == 1


def _names_explicitly(pattern: str) -> bool:
    """A pattern names routers only when its last dotted part has no wildcard (``mlp.gate``, ``*.router``)."""
    return not (set(pattern.rpartition(".")[2]) & _GLOB_CHARS)


def _adapter_prefixes(layer: nn.Module) -> list[str]:
    """Names of the adapter containers (``lora_A``, ``lora_B``...) of peft tuner layers in ``layer``."""
    prefixes = []
    for name, module in layer.named_modules():
        adapter_names = getattr(module, "adapter_layer_names", None)
        if adapter_names and hasattr(module, "base_layer"):
            prefixes += [f"{name}.{attr}" if name else attr for attr in adapter_names]
    return prefixes


def decoder_operators(model: nn.Module, include_routers: bool = False) -> Iterator[Operator]:
    """Every operator of every decoder layer of a (possibly wrapped) model (Linear, Conv1D, each
    expert's slice of a fused expert weight; routers only if asked), as named in the pruning
    record: the one walk that reports, record checks, masks and LoRA merges use."""
    layout = DecoderLayout(unwrap_model(model))
    for index in range(len(layout)):
        yield from layout.operators(index, include_routers=include_routers)


def _clean(name: str) -> str:
    """A module name without peft's ``base_layer`` parts, as in the model before wrapping."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _under(name: str, prefixes: list[str] | set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class DecoderLayout:
    """Finds a causal LM's decoder layers and the operators inside them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.model_type = getattr(getattr(model, "config", None), "model_type", None)
        self.layers_path, self.layers = find_decoder_layers(model)
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.hidden_size = getattr(text_config, "hidden_size", None)
        self._banks: dict[int, tuple[list[tuple[str, str, ExpertBank]], list[str]]] = {}
        self._spec: ArchitectureSpec | None = None
        self._layer_specs: dict[int, ArchitectureSpec] = {}
        self._has_experts: bool | None = None
        if not any(self.operators(i, include_routers=True) or self._banks[i][1] for i in range(len(self))):
            layer = self.layers[0]
            params = ", ".join(f"{n} {tuple(p.shape)}" for n, p in list(layer.named_parameters())[:8])
            raise UnsupportedArchitectureError(
                f"found {len(self)} decoder layers at {self.layers_path} ({type(layer).__name__}) in "
                f"{type(model).__name__}, but no nn.Linear, GPT-2 Conv1D or stacked expert weights inside them "
                f"(layer 0 holds: {params or 'no parameters'}). hf_prune prunes those operators only; `targets` "
                "(globs such as 'model.layers.*.mlp.*') can narrow them down but not add other kinds of weights"
            )

    def __len__(self) -> int:
        return len(self.layers)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}"

    def expert_banks(self, index: int) -> list[ExpertBank]:
        """The stacked routed-expert weights of layer ``index`` that the walker can read."""
        return [bank for _, _, bank in self._read_banks(index)[0]]

    def unreadable_experts(self, index: int) -> list[str]:
        """Layer-relative paths of expert modules whose weight layout the walker does not know."""
        return self._read_banks(index)[1]

    def _read_banks(self, index: int) -> tuple[list[tuple[str, str, ExpertBank]], list[str]]:
        """``([(raw path, clean path, bank)], [unreadable clean paths])`` for layer ``index``."""
        if index not in self._banks:
            readable, unreadable = [], []
            for raw, module in self.layers[index].named_modules():
                if not raw or not looks_like_experts(module):
                    continue
                clean = _clean(raw)
                try:
                    readable.append((raw, clean, read_expert_bank(clean, module, self.hidden_size)))
                except UnsupportedArchitectureError as err:
                    unreadable.append(clean)
                    logger.warning_once(str(err))
            self._banks[index] = (readable, unreadable)
        return self._banks[index]

    def operators(self, index: int, include_routers: bool = False) -> list[Operator]:
        """Every prunable operator of layer ``index``, in module order (routers only if asked).

        Works through peft: a LoRA-wrapped ``q_proj`` yields its ``base_layer`` under the name
        ``...self_attn.q_proj``; the adapters' own ``lora_A``/``lora_B`` are not operators.
        """
        prefix = self.layer_prefix(index)
        layer = self.layers[index]
        skip = _adapter_prefixes(layer)
        banks, unreadable = self._read_banks(index)
        bank_by_raw = {raw: (clean, bank) for raw, clean, bank in banks}
        expert_modules = [raw for raw, _, _ in banks] + unreadable
        expert_parents = {path.rpartition(".")[0] for path in [clean for _, clean, _ in banks] + unreadable}
        ops: list[Operator] = []
        for raw, module in layer.named_modules():
            if not raw or _under(raw, skip):
                continue
            if raw in bank_by_raw:
                clean, bank = bank_by_raw[raw]
                ops += [
                    Operator(f"{prefix}.{clean}.{p.parameter}.{e}", f"{clean}.{p.parameter}.{e}", index, module,
                             parameter=p.parameter, expert=e, kind="expert", stored_transposed=bank.layout.transposed,
                             module_name=f"{prefix}.{clean}")
                    for p in bank.projections for e in range(bank.num_experts)
                ]
                continue
            if any(raw.startswith(e + ".") for e in expert_modules):
                continue
            clean = _clean(raw)
            beside_experts = clean.rpartition(".")[0] in expert_parents
            if is_prunable(module):
                kind = "router" if _is_router(clean, module, beside_experts) else "linear"
            elif (isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() == 2
                  and not isinstance(module, nn.Embedding) and _is_router(clean, module, beside_experts)):
                kind = "router"
            else:
                continue
            if kind == "router" and not include_routers:
                continue
            ops.append(Operator(f"{prefix}.{clean}", clean, index, module, kind=kind))
        return ops

    def targeted_operators(self, index: int, targets: list[str] | None) -> list[Operator]:
        """The operators of layer ``index`` whose full or layer-relative name matches ``targets``.

        Routers match only patterns that name them explicitly (``"mlp.gate"``, ``"*.router"``,
        not ``"mlp.*"``); with no ``targets``, every operator but the routers.
        """
        if targets is None:
            return self.operators(index)
        return [
            op for op in self.operators(index, include_routers=True)
            if any(op.matches(t) and (op.kind != "router" or _names_explicitly(t)) for t in targets)
        ]

    def all_targeted(self, targets: list[str] | None) -> list[list[Operator]]:
        """Targeted operators per layer; raises when ``targets`` matches nothing at all, or would take
        expert weights whose layout the walker cannot read."""
        for index in range(len(self)):
            for path in self.unreadable_experts(index):
                full = f"{self.layer_prefix(index)}.{path}"
                module = self.submodule(index, path)
                names = [f"{full}.{p}" for p in three_d_parameters(module)] + [full]
                if targets is None or any(fnmatch.fnmatchcase(n, t) or fnmatch.fnmatchcase(n.split(
                        f"{self.layer_prefix(index)}.", 1)[1], t) for n in names for t in targets):
                    raise UnsupportedArchitectureError(
                        f"{full} ({type(module).__name__}) holds stacked expert weights "
                        f"{three_d_parameters(module)} in a layout hf_prune cannot read, so they cannot be pruned. "
                        "Pass `targets` that leave them out (e.g. targets=['*attn*', '*shared_expert*']): the other "
                        f"operators of this layer are {', '.join(op.local_name for op in self.operators(index)[:8])}"
                    )
        per_layer = [self.targeted_operators(i, targets) for i in range(len(self))]
        if not any(per_layer):
            example = ", ".join(op.local_name for op in self.operators(0)[:12]) if len(self) else "none"
            raise ValueError(
                f"targets {targets!r} match no operator inside the decoder layers. Patterns are globs on "
                f"full names ('{self.layer_prefix(0)}.mlp.*') or layer-relative names; this model's "
                f"layer operators are: {example}"
            )
        return per_layer

    def submodule(self, index: int, local_name: str) -> nn.Module:
        module = get_path(self.layers[index], local_name)
        if module is None:
            raise KeyError(f"layer {index} has no module {local_name!r}")
        return module

    def layer_spec(self, index: int) -> ArchitectureSpec:
        """The MLP and attention roles of layer ``index`` (empty where it has none; see ``missing``)."""
        widths = {op.local_name: (op.out_features, op.in_features) for op in self.operators(index)
                  if op.kind == "linear"}
        experts = tuple(bank.path for bank in self.expert_banks(index)) + tuple(self.unreadable_experts(index))
        return derive_spec(self.layers_path, widths, experts, self.model_type, self.model.config)

    def has_experts(self) -> bool:
        """Whether any decoder layer holds stacked routed-expert weights (readable or not)."""
        if self._has_experts is None:
            self._has_experts = any(self.expert_banks(i) or self.unreadable_experts(i) for i in range(len(self)))
        return self._has_experts

    def attention_spec(self, index: int) -> ArchitectureSpec:
        """The roles naming layer ``index``'s attention projections.

        The shared :attr:`spec` for dense models (which raises as it does when their layers differ); for
        mixtures of experts, whose layers share no dense MLP and so no shared spec, the layer's own spec,
        whose ``has_attention`` says whether the layer has multi-head attention the walker recognises.
        """
        if self._spec is not None or not self.has_experts():
            return self.spec
        if index not in self._layer_specs:
            self._layer_specs[index] = self.layer_spec(index)
        return self._layer_specs[index]

    @property
    def spec(self) -> ArchitectureSpec:
        """The roles every decoder layer shares, for structured methods (read once per layout).

        Raises ``UnsupportedArchitectureError`` naming what is missing when the layers differ
        (hybrid models), or have no dense MLP (mixtures of experts).
        """
        if self._spec is None:
            self._spec = self._shared_spec()
        return self._spec

    def _shared_spec(self) -> ArchitectureSpec:
        first = self.layer_spec(0)
        fused = first.fused_gate_up
        for index in range(1, len(self)):
            other = self.layer_spec(index)
            fused = fused or other.fused_gate_up  # a layer left with no neuron cannot show it by width
            if replace(other, fused_gate_up=first.fused_gate_up) != first:
                raise UnsupportedArchitectureError(
                    f"{type(self.model).__name__} ({self.model_type}): decoder layers 0 and {index} have different "
                    f"projections (MLP {first.mlp_out} / {other.mlp_out}, attention output {first.o} / {other.o}; "
                    f"{'; '.join(other.missing or first.missing) or 'different names'}); structured methods need "
                    "the same MLP and attention in every layer"
                )
        if not first.has_mlp:
            raise UnsupportedArchitectureError(
                f"{type(self.model).__name__} ({self.model_type}): structured methods cannot tell this model's MLP "
                f"apart: {'; '.join(first.missing)}"
            )
        return replace(first, fused_gate_up=fused)
