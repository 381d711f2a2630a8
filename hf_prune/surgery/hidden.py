"""Removing residual-stream channels (the hidden size) from a whole model, consistently.

The residual stream is ``hidden_size`` wide everywhere: the token (and GPT-2's position)
embeddings write it, every decoder layer's norms read it, the attention and MLP input
projections (q/k/v or fused qkv, gate/up or fused gate_up, fc1, c_attn) read it, their output
projections (o_proj, down_proj, fc2, c_proj) write it, and the final norm and the LM head read
it. Keeping the channels ``keep`` means slicing all of them along that axis: embedding
columns, norm weights and biases, input columns of every reader, output rows (and bias entries)
of every writer, LM head columns. A tied LM head stays the embedding's parameter.

In a mixture of experts the MLP of a layer is a routed block: its router reads the residual
stream (a ``[experts, hidden]`` weight), every routed expert's gate/up slice reads it and its
down slice (and down bias) writes it, and shared experts and their gates are Linear readers
and writers like a dense MLP's.

The config then says ``hidden_size`` (``n_embd`` for GPT-2) is ``len(keep)``:

* families with a ``head_dim`` config field keep their head width, written out explicitly (many
  derive it from ``hidden_size / num_attention_heads`` when it is absent);
* families whose attention width *is* the hidden size (GPT-2, OPT: ``head_dim = hidden_size /
  heads``) also lose head channels: every head keeps ``len(keep) / heads`` of its query/key
  channels and of its value/output channels (``HeadChannels``), and the queries are scaled so
  that ``q·k / sqrt(head_dim)`` is unchanged for the kept channels;
* GPT-2's ``n_inner`` (``None``: four times the hidden size) is written out;
* Gemma's embedding scale ``sqrt(hidden_size)`` follows the new size, as transformers computes
  it from the config on load; an untied embedding absorbs the ratio so that the kept channels of
  the embedding output are unchanged.

:func:`check_hidden_pruning` runs the whole surgery on a meta-device copy built from the config
and compares it with what transformers builds from the new config, so a family whose residual
parameters this module does not know is refused before any work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from ..errors import UnsupportedArchitectureError
from ..walker.experts import ExpertBank
from ..walker.layout import DecoderLayout
from .geometry import attention_geometry, attention_input_names, attention_module
from .shrink import as_index, keep_inputs, keep_outputs

#: model types whose attention width is ``hidden_size`` (head_dim derived, no config field for it)
COUPLED_ATTENTION = frozenset({"gpt2", "opt"})
#: module attributes holding the hidden size (updated when equal to the old one)
SIZE_ATTRIBUTES = ("hidden_size", "hidden_dim", "embed_dim", "embedding_dim", "normalized_shape")

#: the families hidden-size pruning supports, for error messages
SUPPORTED = ("families with multi-head attention, pre-norms and a dense MLP or routed experts in every layer (llama, "
             "qwen3, gemma, phi3, gpt2, mixtral, qwen3_moe, gpt_oss...)")
#: chooses, per head, the head channels kept: ``(layout, layer index, head_dim kept) -> (qk, vo)``
#: index tensors of shape ``[heads, kept head_dim]``
HeadChooser = Callable[[DecoderLayout, int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ResidualModules:
    """Every module that reads or writes the residual stream, by how it is sliced."""

    embeddings: list[nn.Embedding] = field(default_factory=list)
    norms: list[nn.Module] = field(default_factory=list)
    readers: list[nn.Module] = field(default_factory=list)  # input columns (incl. the LM head)
    writers: list[nn.Module] = field(default_factory=list)  # output rows and bias entries
    routers: list[nn.Module] = field(default_factory=list)  # MoE routers that are not Linear: weight columns
    experts: list[ExpertBank] = field(default_factory=list)  # stacked routed experts: see keep_expert_channels


def hidden_config_key(config: PretrainedConfig) -> str:
    """The config key that holds the hidden size (``n_embd`` for GPT-2)."""
    return (getattr(config, "attribute_map", None) or {}).get("hidden_size", "hidden_size")


def coupled_attention(layout: DecoderLayout) -> bool:
    """Whether the family's attention width is its hidden size (so head channels go with it)."""
    return layout.model_type in COUPLED_ATTENTION


def _config_accepts_hidden_size(config: PretrainedConfig, hidden: int) -> bool:
    try:
        type(config).from_dict({**config.to_dict(), hidden_config_key(config): hidden})
    except (ValueError, TypeError, StrictDataclassError):
        return False
    return True


def hidden_size_multiple(layout: DecoderLayout) -> int:
    """What the kept hidden size must be a multiple of: the attention heads where the head width is
    ``hidden_size / heads`` (GPT-2, OPT) or where the family's config refuses a hidden size they do not
    divide (transformers 5's Llama and others validate it even with an explicit ``head_dim``); else 1."""
    heads = attention_geometry(layout, 0).heads
    if heads <= 1 or coupled_attention(layout):
        return max(heads, 1)
    config = layout.model.config
    hidden = int(layout.hidden_size)
    if hidden % heads == 0 and not _config_accepts_hidden_size(config, hidden - 1) \
            and _config_accepts_hidden_size(config, hidden - heads):
        return heads
    return 1


def layer_norms(layout: DecoderLayout, index: int) -> list[nn.Module]:
    """The norms of layer ``index`` on the residual stream: its direct children with a 1-D weight of the
    hidden size (input/post-attention norms, Gemma's pre/post-feedforward norms; not q/k norms)."""
    hidden = layout.hidden_size
    return [child for _, child in layout.layers[index].named_children()
            if isinstance(getattr(child, "weight", None), torch.Tensor) and child.weight.dim() == 1
            and child.weight.shape[0] == hidden]


def final_norms(layout: DecoderLayout) -> list[nn.Module]:
    """Norms outside the decoder layers over the hidden size (the final norm)."""
    inside = {id(m) for layer in layout.layers for m in layer.modules()}
    hidden = layout.hidden_size
    return [module for module in layout.model.modules()
            if id(module) not in inside and not isinstance(module, (nn.Embedding, nn.Linear, Conv1D))
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1
            and module.weight.shape[0] == hidden]


def residual_modules(layout: DecoderLayout) -> ResidualModules:
    """Find every module on the residual stream (raises for families without multi-head attention and either a
    dense MLP or routed experts in every layer)."""
    model, hidden = layout.model, layout.hidden_size
    for index in range(len(layout)):
        spec = layout.attention_spec(index)
        if not spec.has_attention:
            raise UnsupportedArchitectureError(
                f"{layout.model_type}: hidden-size pruning needs multi-head attention in every layer; layer {index}: "
                f"{'; '.join(spec.missing)}")
    found = ResidualModules()
    inside = {id(m) for layer in layout.layers for m in layer.modules()}
    found.embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding) and id(m) not in inside
                        and m.embedding_dim == hidden]
    if model.get_input_embeddings() not in found.embeddings:
        raise UnsupportedArchitectureError(f"{type(model).__name__}: the input embeddings are not {hidden} wide")
    found.norms = [norm for index in range(len(layout)) for norm in layer_norms(layout, index)] + final_norms(layout)
    for index in range(len(layout)):
        spec = layout.attention_spec(index)
        found.readers.extend(layout.submodule(index, name) for name in attention_input_names(layout, index))
        found.writers.append(layout.submodule(index, spec.o))
        if spec.has_mlp:
            found.readers.extend(layout.submodule(index, name) for name in spec.mlp_in)
            found.writers.append(layout.submodule(index, spec.mlp_out))
        else:
            _add_routed_block(layout, index, found)
    head = model.get_output_embeddings()
    if head is not None:
        found.readers.append(head)
    return found


def _add_routed_block(layout: DecoderLayout, index: int, found: ResidualModules) -> None:
    """Add the residual-stream modules of layer ``index``'s mixture-of-experts block: its expert banks, its router
    and the Linear layers beside them (shared experts and their gates), told apart by which side is hidden wide."""
    hidden = layout.hidden_size
    banks = layout.expert_banks(index)
    if not banks or layout.unreadable_experts(index):
        raise UnsupportedArchitectureError(
            f"{layout.model_type}: hidden-size pruning needs a dense MLP or routed experts it can read in every "
            f"layer; layer {index} has {', '.join(layout.unreadable_experts(index)) or 'neither'}")
    for bank in banks:
        block_path = bank.path.rpartition(".")[0]
        if not block_path:
            raise UnsupportedArchitectureError(
                f"{layout.model_type}: the routed experts of layer {index} sit directly in the decoder layer, not in "
                "a block with their router; hidden-size pruning cannot tell that block's modules apart")
        found.experts.append(bank)
        inside_bank = {id(module) for module in bank.module.modules()}
        for name, module in layout.submodule(index, block_path).named_modules():
            if id(module) in inside_bank:
                continue
            if isinstance(module, (nn.Linear, Conv1D)):
                reads, writes = _in_width(module) == hidden, _out_width(module) == hidden
                if reads and writes:
                    raise UnsupportedArchitectureError(
                        f"{layout.model_type}: {block_path}.{name} maps the hidden size to itself inside the "
                        f"mixture-of-experts block of layer {index}; hidden-size pruning does not know which side "
                        "is the residual stream")
                if reads:
                    found.readers.append(module)
                elif writes:
                    found.writers.append(module)
                continue
            weight = module._parameters.get("weight")
            if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == hidden:
                found.routers.append(module)  # a router kept as a bare [experts, hidden] weight


def _in_width(module: nn.Module) -> int:
    return int(module.weight.shape[0 if isinstance(module, Conv1D) else 1])


def _out_width(module: nn.Module) -> int:
    return int(module.weight.shape[1 if isinstance(module, Conv1D) else 0])


def keep_expert_channels(bank: ExpertBank, channels: torch.Tensor) -> None:
    """Keep the residual channels ``channels`` of every routed expert of ``bank``: the input side of each
    gate/up slice, the output side of each down slice and its bias."""
    transposed = bank.layout.transposed
    for projection in bank.projections:
        reads = projection.role != "down"  # an expert slice is (out, in): gate/up read hidden, down writes it
        dim = (1 if transposed else 2) if reads else (2 if transposed else 1)
        _slice(bank.module, projection.parameter, dim, channels)
        if not reads and projection.bias is not None:
            _slice(bank.module, projection.bias, 1, channels)


def _slice(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(old.data.index_select(dim, index.to(old.device)).clone(),
                                       requires_grad=old.requires_grad))


def _rename_sizes(model: nn.Module, old: int, new: int) -> None:
    """Set the size attributes forwards read (``hidden_size``, ``embed_dim``, LayerNorm's ``normalized_shape``...)
    from ``old`` to ``new`` in every module."""
    for module in model.modules():
        for name in SIZE_ATTRIBUTES:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == old:
                setattr(module, name, new)
            elif isinstance(value, tuple) and value == (old,):
                setattr(module, name, (new,))


def _slice_norm(norm: nn.Module, index: torch.Tensor) -> None:
    """Keep the channels ``index`` of a norm's weight and bias."""
    for name in ("weight", "bias"):
        if isinstance(getattr(norm, name, None), nn.Parameter):
            _slice(norm, name, 0, index)


def weight_head_chooser(layout: DecoderLayout, index: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head channels kept, by weight norms: query/key channel ``d`` of a head scores
    ``‖W_q[d]‖·‖W_k[d]‖``, value/output channel ``d`` scores ``‖W_v[d]‖·‖W_o[:, d]‖``."""
    geometry = attention_geometry(layout, index)
    heads, head_dim = geometry.heads, geometry.head_dim
    q, k, v = _qkv_weights(layout, index, geometry.heads * head_dim)
    o = _out_in(layout.submodule(index, layout.spec.o)).float()
    qk = (q.float().norm(dim=1) * k.float().norm(dim=1)).reshape(heads, head_dim)
    vo = (v.float().norm(dim=1) * o.norm(dim=0)).reshape(heads, head_dim)
    return (qk.topk(keep, dim=1).indices.sort(dim=1).values, vo.topk(keep, dim=1).indices.sort(dim=1).values)


def _out_in(module: nn.Module) -> torch.Tensor:
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def _qkv_weights(layout: DecoderLayout, index: int, width: int) -> tuple[torch.Tensor, ...]:
    spec = layout.spec
    if spec.qkv is None:
        return tuple(_out_in(layout.submodule(index, name)) for name in (spec.q, spec.k, spec.v))
    fused = _out_in(layout.submodule(index, spec.qkv))
    return fused[:width], fused[width:2 * width], fused[2 * width:]


def _shrink_heads(layout: DecoderLayout, index: int, keep: int, chooser: HeadChooser) -> tuple[int, int]:
    """Keep ``keep`` channels of every head of layer ``index`` (coupled families); returns (old, new) head_dim."""
    geometry = attention_geometry(layout, index)
    heads, head_dim = geometry.heads, geometry.head_dim
    if geometry.kv_heads != heads:
        raise UnsupportedArchitectureError(f"{layout.model_type}: hidden-size pruning shrinks the heads of "
                                           "multi-head attention only (no grouped key/value heads)")
    qk, vo = chooser(layout, index, keep)
    base = torch.arange(heads).unsqueeze(1) * head_dim
    qk_rows, vo_rows = (base + qk).reshape(-1), (base + vo).reshape(-1)
    spec = layout.spec
    width = heads * head_dim
    scale = math.sqrt(keep / head_dim) if getattr(layout.model.config, "scale_attn_weights", True) else 1.0
    if spec.qkv is None:
        for name, rows in ((spec.q, qk_rows), (spec.k, qk_rows), (spec.v, vo_rows)):
            keep_outputs(layout.submodule(index, name), rows)
        _scale_outputs(layout.submodule(index, spec.q), slice(0, heads * keep), scale)
    else:
        if spec.qkv_layout != "blocks":
            raise UnsupportedArchitectureError(f"{layout.model_type}: fused qkv rows interleaved per head are not "
                                               "supported by hidden-size pruning")
        fused = layout.submodule(index, spec.qkv)
        keep_outputs(fused, torch.cat([qk_rows, qk_rows + width, vo_rows + 2 * width]))
        _scale_outputs(fused, slice(0, heads * keep), scale)
    keep_inputs(layout.submodule(index, spec.o), vo_rows)
    attn = attention_module(layout, index)
    if isinstance(getattr(attn, "head_dim", None), int):
        attn.head_dim = keep
    if isinstance(getattr(attn, "split_size", None), int):
        attn.split_size = heads * keep
    if isinstance(getattr(attn, "scaling", None), float) and scale != 1.0:
        attn.scaling = attn.scaling * head_dim ** 0.5 / keep ** 0.5
    return head_dim, keep


def _scale_outputs(module: nn.Module, rows: slice, scale: float) -> None:
    """Multiply output features ``rows`` (weight and bias) of a Linear / Conv1D by ``scale``."""
    if scale == 1.0:
        return
    with torch.no_grad():
        if isinstance(module, Conv1D):
            module.weight[:, rows] *= scale
        else:
            module.weight[rows] *= scale
        if getattr(module, "bias", None) is not None:
            module.bias[rows] *= scale


@dataclass
class HiddenChange:
    """What :func:`prune_hidden` changed: sizes before and after and the config fields it wrote."""

    hidden_before: int
    hidden_after: int
    head_dim_before: int
    head_dim_after: int
    config_fields: dict[str, int]
    embedding_scale: tuple[float, float] | None = None


def prune_hidden(layout: DecoderLayout, keep: Any, chooser: HeadChooser = weight_head_chooser) -> HiddenChange:
    """Keep only the residual channels ``keep`` of the whole model, and say so in its config.

    ``chooser`` picks the head channels kept where the attention width is the hidden size
    (GPT-2, OPT). Returns what changed; the model's config holds the new sizes afterwards.
    """
    model, config = layout.model, layout.model.config
    old = int(layout.hidden_size)
    channels = as_index(keep, old, "hidden channels")
    new = int(channels.numel())
    modules = residual_modules(layout)
    head_dim = attention_geometry(layout, 0).head_dim
    heads = attention_geometry(layout, 0).heads
    coupled = coupled_attention(layout)
    if coupled and new % heads:
        raise ValueError(f"{layout.model_type}'s head width is hidden_size / num_attention_heads, so the kept hidden "
                         f"size must be a multiple of its {heads} heads, got {new}")
    fields: dict[str, int] = {}
    if "n_inner" in config.to_dict() and getattr(config, "n_inner", None) is None:  # GPT-2: 4 x hidden if absent
        fields["n_inner"] = _in_width(layout.submodule(0, layout.spec.mlp_out))
    if getattr(config, "word_embed_proj_dim", None) == old:  # OPT: embeddings as wide as the residual stream
        fields["word_embed_proj_dim"] = new
    new_head_dim = head_dim
    if coupled:
        for index in range(len(layout)):
            _, new_head_dim = _shrink_heads(layout, index, new // heads, chooser)
    else:  # many families derive head_dim from hidden_size / num_attention_heads when it is absent
        fields["head_dim"] = head_dim
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    scale = _embedding_scale(model.get_input_embeddings(), old)
    for embedding in modules.embeddings:
        _slice(embedding, "weight", 1, channels)
        embedding.embedding_dim = new
    for norm in modules.norms:
        _slice_norm(norm, channels)
    for reader in modules.readers:
        if tied and reader is head:
            continue
        keep_inputs(reader, channels)
    for writer in modules.writers:
        keep_outputs(writer, channels)
    for router in modules.routers:
        _slice(router, "weight", 1, channels)
    for bank in modules.experts:
        keep_expert_channels(bank, channels)
    if tied:
        head.weight = model.get_input_embeddings().weight
        if isinstance(head, nn.Linear):
            head.in_features = new
    embedding_scale = None
    if scale is not None:
        embedding_scale = _rescale_embedding(model.get_input_embeddings(), old, new, fold=not tied)
    _rename_sizes(model, old, new)
    fields[hidden_config_key(config)] = new
    for key, value in fields.items():
        setattr(config, key, value)
    layout.hidden_size = new
    return HiddenChange(old, new, head_dim, new_head_dim, fields, embedding_scale)


def _embedding_scale(embedding: nn.Module, hidden: int) -> float | None:
    """Gemma's ``sqrt(hidden_size)`` embedding scale, when the embedding has one (``None`` on the meta device,
    where only shapes matter)."""
    scale = getattr(embedding, "embed_scale", None)
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or scale.device.type == "meta":
        return None
    value = float(scale)
    return value if math.isclose(value, hidden ** 0.5, rel_tol=1e-2) else None


def _rescale_embedding(embedding: nn.Module, old: int, new: int, fold: bool) -> tuple[float, float]:
    """Set the embedding scale to ``sqrt(new)`` as transformers will on load; with ``fold`` the weights absorb
    ``sqrt(old / new)`` so that the embedding outputs are unchanged."""
    before = float(embedding.embed_scale)
    after = float(torch.tensor(float(new) ** 0.5, dtype=embedding.embed_scale.dtype))
    embedding.embed_scale.fill_(after)
    if isinstance(getattr(embedding, "scalar_embed_scale", None), float):
        embedding.scalar_embed_scale = new ** 0.5
    if fold:
        with torch.no_grad():
            embedding.weight.mul_(before / after)
    return before, after


def check_hidden_pruning(model: nn.Module, new: int) -> None:
    """Refuse, before any work, a model whose hidden size this module cannot shrink to ``new`` channels so that
    transformers builds the result from the new config alone (a dry run on the meta device)."""
    base = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(model.config), None)
    if base is None:
        raise UnsupportedArchitectureError(f"transformers has no causal-LM class for {type(model.config).__name__}")
    config = type(model.config).from_dict(model.config.to_dict())
    with torch.device("meta"):
        skeleton = base(config)
    layout = DecoderLayout(skeleton)

    def first_channels(layout: DecoderLayout, index: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        geometry = attention_geometry(layout, index)
        rows = torch.arange(keep).expand(geometry.heads, keep)
        return rows, rows

    try:
        change = prune_hidden(layout, torch.arange(new), first_channels)
    except (AttributeError, TypeError, RuntimeError) as err:  # a module or config this surgery cannot change
        raise UnsupportedArchitectureError(
            f"hidden-size pruning cannot shrink {layout.model_type} ({type(err).__name__}: {err}). Supported: "
            f"{SUPPORTED}") from None
    try:
        rebuilt_config = type(config).from_dict({**config.to_dict(), **change.config_fields})
        with torch.device("meta"):
            rebuilt = base(rebuilt_config)
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise UnsupportedArchitectureError(
            f"{type(config).__name__} refuses the pruned sizes {change.config_fields}: {err}") from None
    expected = {name: tuple(p.shape) for name, p in rebuilt.named_parameters()}
    actual = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    if expected != actual:
        differing = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
        raise UnsupportedArchitectureError(
            f"hidden-size pruning does not know every residual-stream parameter of {layout.model_type}: after "
            f"removing channels, {', '.join(differing[:4])}{'...' if len(differing) > 4 else ''} would differ from "
            f"what transformers builds from the new config. Supported: {SUPPORTED}")
