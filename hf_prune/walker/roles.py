"""Which projections of a decoder layer are the MLP's and the attention's, told by their names.

Structured methods (removing MLP neurons and attention heads) and the engine's chunked
pass need to know a layer's MLP inputs and output and its attention q/k/v (or fused qkv)
and output. They are recognised by the names transformers' families use, inside one
parent module: ``gate_proj``/``up_proj``/``down_proj``, ``fc1``/``fc2``, ``c_fc``/``c_proj``,
``w1``/``w3``/``w2``, ``dense_h_to_4h``/``dense_4h_to_h``, ``input_linear``/``output_linear``,
fused ``gate_up_proj``; ``q_proj``/``k_proj``/``v_proj`` or fused ``qkv_proj``, ``c_attn``,
``query_key_value``, ``Wqkv`` with ``o_proj``/``out_proj``/``dense``/``c_proj``. A fused
gate/up projection is told by its width (twice the MLP's). ``FAMILY_EXCEPTIONS`` holds the
few families whose fused qkv rows are not ``[q; k; v]`` blocks.

A layer whose MLP is a mixture of experts, or whose token mixer is not multi-head
attention with separate heads (DeepSeek's MLA, linear attention, Mamba), has no MLP or
attention role; ``ArchitectureSpec.missing`` says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

#: MLP projections by name, inside one parent: (input projections, output projection).
MLP_NAMES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("gate_proj", "up_proj"), "down_proj"),
    (("gate_up_proj",), "down_proj"),
    (("w1", "w3"), "w2"),
    (("fc1",), "fc2"),
    (("c_fc",), "c_proj"),
    (("dense_h_to_4h",), "dense_4h_to_h"),
    (("input_linear",), "output_linear"),
    (("up_proj",), "down_proj"),
)

#: Attention projections by name, inside one parent: (input projections, possible output names).
ATTENTION_NAMES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("q_proj", "k_proj", "v_proj"), ("o_proj", "out_proj", "dense", "c_proj")),
    (("qkv_proj",), ("o_proj", "out_proj", "dense")),
    (("c_attn",), ("c_proj",)),
    (("query_key_value",), ("dense",)),
    (("Wqkv",), ("out_proj",)),
)


@dataclass(frozen=True)
class ArchitectureSpec:
    """Names inside one decoder layer (relative to the layer).

    ``mlp_in`` are the projections whose output rows are MLP neurons; ``mlp_out`` consumes
    them as input columns. ``fused_gate_up`` marks a single projection holding the gate
    rows then the up rows. Attention: separate ``q/k/v`` or one fused ``qkv`` projection
    (``qkv_layout`` "blocks": [q; k; v]; "per_head": heads interleaved as [q_h, k_h, v_h]).
    A role the layer lacks is empty (``None``/``()``) and ``missing`` says why.
    """

    layers_path: str
    mlp_in: tuple[str, ...] = ()
    mlp_out: str | None = None
    fused_gate_up: bool = False
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    qkv_layout: str = "blocks"
    o: str | None = None
    experts: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()

    @property
    def has_mlp(self) -> bool:
        return self.mlp_out is not None

    @property
    def has_attention(self) -> bool:
        return self.o is not None


def _falcon(spec: ArchitectureSpec, config: Any) -> ArchitectureSpec:
    """Falcon's fused qkv: [q; k; v] blocks with multi-query, per head without, grouped per KV head
    in the new decoder architecture (which the head geometry does not cover)."""
    if getattr(config, "new_decoder_architecture", False):
        return replace(spec, qkv=None, o=None, missing=(*spec.missing, (
            "attention: Falcon's new decoder architecture groups its fused query_key_value rows per KV head, "
            "which structured head pruning does not support")))
    if not getattr(config, "multi_query", True):
        return replace(spec, qkv_layout="per_head")
    return spec


#: Families whose roles the names alone do not give.
FAMILY_EXCEPTIONS: dict[str, Callable[[ArchitectureSpec, Any], ArchitectureSpec]] = {
    "gpt_neox": lambda spec, config: replace(spec, qkv_layout="per_head"),
    "bloom": lambda spec, config: replace(spec, qkv_layout="per_head"),
    "falcon": _falcon,
}


def _split(name: str) -> tuple[str, str]:
    parent, _, leaf = name.rpartition(".")
    return parent, leaf


def _join(parent: str, leaf: str) -> str:
    return f"{parent}.{leaf}" if parent else leaf


def derive_spec(layers_path: str, widths: dict[str, tuple[int, int]], experts: tuple[str, ...],
                model_type: str | None, config: Any) -> ArchitectureSpec:
    """The roles of one decoder layer from its Linear projections.

    ``widths`` maps each layer-relative projection name to its ``(out, in)`` shape (routers
    and expert weights excluded); ``experts`` are the layer's expert banks.
    """
    by_parent: dict[str, set[str]] = {}
    for name in widths:
        parent, leaf = _split(name)
        by_parent.setdefault(parent, set()).add(leaf)
    missing: list[str] = []

    mlps = []
    for parent, leaves in by_parent.items():
        for inputs, output in MLP_NAMES:
            if output in leaves and all(name in leaves for name in inputs):
                if output == "c_proj" and "c_attn" in leaves:  # GPT-2's attention output, not an MLP
                    continue
                mlps.append((tuple(_join(parent, n) for n in inputs), _join(parent, output)))
                break
    fields: dict[str, Any] = {}
    if experts:
        missing.append(f"mlp: the MLP is a mixture of experts ({', '.join(experts)}); structured methods remove "
                       "the neurons inside its routed experts instead (activation-norm- and l1-norm-structured)")
    elif len(mlps) == 1:
        inputs, output = mlps[0]
        width = widths[output][1]  # 0 in a layer whose neurons were all removed: then only the name tells
        fused = len(inputs) == 1 and (_split(inputs[0])[1] == "gate_up_proj"
                                      or (width > 0 and widths[inputs[0]][0] == 2 * width))
        fields.update(mlp_in=inputs, mlp_out=output, fused_gate_up=fused)
    else:
        found = ", ".join(out for _, out in mlps) or "none"
        missing.append(f"mlp: no single MLP recognised by its projection names (output projections found: {found})")

    attentions = []
    for parent, leaves in by_parent.items():
        for inputs, outputs in ATTENTION_NAMES:
            output = next((o for o in outputs if o in leaves), None)
            if output is not None and all(name in leaves for name in inputs):
                attentions.append((tuple(_join(parent, n) for n in inputs), _join(parent, output)))
                break
    if len(attentions) == 1:
        inputs, output = attentions[0]
        if len(inputs) == 3:
            fields.update(q=inputs[0], k=inputs[1], v=inputs[2], o=output)
        else:
            fields.update(qkv=inputs[0], o=output)
    else:
        projections = ", ".join(sorted(n for n in widths if "attn" in n or "attention" in n or "mixer" in n)[:6])
        missing.append("attention: no multi-head attention with q/k/v (or fused qkv) and output projections "
                       "recognised by name (e.g. MLA, linear attention or a Mamba mixer; found "
                       f"{projections or 'none'})")
    spec = ArchitectureSpec(layers_path=layers_path, experts=experts, missing=tuple(missing), **fields)
    exception = FAMILY_EXCEPTIONS.get(model_type or "")
    return exception(spec, config) if exception is not None else spec
