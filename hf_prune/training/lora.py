"""LoRA adapters (peft) on pruned models, and merging them without losing the sparsity.

A LoRA update ``B @ A`` is dense. peft's ``merge_and_unload()`` adds it to every entry of
the base weight, so **a plainly merged adapter fills all the pruned zeros back in**: the
model is dense again, and hf_prune refuses to load the saved checkpoint as pruned (its
record no longer matches). ``merge_lora_keep_sparsity`` merges, then sets the pruned
entries back to zero, and reports how much that changed the model.

Unstructured, N:M and structurally shrunk models all take an adapter as they are: peft
sees ordinary ``Linear`` (or GPT-2 ``Conv1D``) shapes, whatever pruning did to them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from ..checkpoint.record import recorded_sparsity
from ..methods.patterns import parse_pattern, satisfies_nm
from ..report import measure_sparsity
from ..walker.experts import read_expert_bank
from ..walker.layout import decoder_operators, unwrap_model
from .masks import check_pruned_weights, pruning_record

logger = logging.get_logger(__name__)

# Logits kept in memory to compare the model before and after the merge (4 bytes each).
MAX_SAMPLE_LOGITS = 2**28


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA support needs peft: pip install 'hf_prune[peft]' (or pip install peft)") from err
    return peft


def sync_linear_shapes(model: nn.Module) -> int:
    """Make each decoder operator's size attributes follow its weight's shape; returns how many changed.

    peft builds adapters from ``in_features``/``out_features`` (``nx``/``nf`` for ``Conv1D``);
    after structured pruning these must describe the shrunk weight.
    """
    changed = 0
    for op in decoder_operators(model):
        if op.kind != "linear":  # fused expert weights have no size attributes to follow
            continue
        module, shape = op.module, tuple(op.module.weight.shape)
        if isinstance(module, Conv1D):
            attrs = {"nx": shape[0], "nf": shape[1]}
        else:
            attrs = {"out_features": shape[0], "in_features": shape[1]}
        for attr, value in attrs.items():
            if getattr(module, attr, value) != value:
                setattr(module, attr, value)
                changed += 1
    if changed:
        logger.info("updated %d in/out feature attributes to the (shrunk) weight shapes", changed)
    return changed


def lora_target_modules(model: nn.Module) -> list[str]:
    """Layer-relative names of every decoder Linear/Conv1D (``self_attn.q_proj``, ``mlp.down_proj``...)."""
    return sorted({op.local_name for op in decoder_operators(model) if op.kind == "linear"})


def lora_target_parameters(model: nn.Module) -> list[str]:
    """Layer-relative names of the fused expert weights (``mlp.experts.gate_up_proj``...): peft adapts
    them with its ``target_parameters`` (one low-rank update per expert)."""
    return sorted({op.local_name.rpartition(".")[0] for op in decoder_operators(model) if op.kind == "expert"})


def apply_lora(model: nn.Module, config: Any = None, r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
               target_modules: list[str] | None = None, **lora_kwargs: Any) -> Any:
    """Wrap a pruned model (unstructured, N:M or structurally shrunk) in a new peft LoRA adapter.

    Args:
        model: the causal LM.
        config: a ``peft.LoraConfig``; if given, the other arguments are ignored.
        r, lora_alpha, lora_dropout: the usual LoRA settings.
        target_modules: module names for peft; default every Linear inside the decoder layers.
        **lora_kwargs: more ``LoraConfig`` fields. ``target_parameters`` defaults to the fused
            expert weights of a mixture-of-experts model (``lora_target_parameters``); pass
            ``target_parameters=[]`` to leave the experts without an adapter.

    The base weights are frozen, so training the adapter cannot touch the zeros; merge it
    back with ``merge_lora_keep_sparsity`` (not ``merge_and_unload``).
    """
    peft = _import_peft()
    sync_linear_shapes(model)
    if config is None:
        conv1d = any(op.transposed and op.kind == "linear" for op in decoder_operators(model))
        lora_kwargs.setdefault("target_parameters", lora_target_parameters(model) or None)
        config = peft.LoraConfig(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            target_modules=target_modules or lora_target_modules(model), task_type="CAUSAL_LM",
            fan_in_fan_out=conv1d, **lora_kwargs,
        )
    return peft.get_peft_model(model, config)


@dataclass
class MergeReport:
    """What ``merge_lora_keep_sparsity`` did and how much re-masking changed the model.

    ``discarded_update``: share (in Frobenius norm) of the adapter's weight update that fell on
    pruned entries and was dropped. The sample fields compare the model with the adapter
    applied unmerged (logits ``z``) against the merged, re-masked model (``z'``), ``None``
    without sample data: relative change ``||z' - z|| / ||z||``, largest absolute change, mean
    per-token KL divergence ``KL(p || p')``; ``adapter_effect_lost`` is ``||z' - z|| / ||z - z0||``
    with ``z0`` the logits without the adapter (0: re-masking lost nothing of what the adapter
    changed, 1: as much as the adapter changed); and the next-token loss without the adapter,
    with it, and merged.
    """

    merged_modules: int
    masked_modules: int
    entries_reset: int
    discarded_update: float
    pattern: str
    sparsity_before: float
    sparsity_after: float
    sample_tokens: int = 0
    logits_relative_change: float | None = None
    logits_max_abs_change: float | None = None
    kl_divergence: float | None = None
    adapter_effect_lost: float | None = None
    loss_base: float | None = None
    loss_adapter: float | None = None
    loss_merged: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"merged {self.merged_modules} adapter modules, re-masked {self.masked_modules} pruned weights "
            f"({self.pattern}): {self.entries_reset} entries set back to zero, "
            f"{self.discarded_update:.1%} of the adapter update (norm) dropped",
            f"decoder sparsity {self.sparsity_before:.4f} before, {self.sparsity_after:.4f} after",
        ]
        if self.sample_tokens:
            lines.append(
                f"on {self.sample_tokens} sample tokens: logits changed by {self.logits_relative_change:.2%} "
                f"(max {self.logits_max_abs_change:.4f}), KL {self.kl_divergence:.5f}, "
                f"{self.adapter_effect_lost:.1%} of the adapter's change to the logits lost; loss "
                f"{self.loss_base:.4f} without the adapter, {self.loss_adapter:.4f} with it, "
                f"{self.loss_merged:.4f} merged"
            )
        return "\n".join(lines)


def _sample_batch(sample: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(sample, torch.Tensor):
        batch = {"input_ids": sample}
    elif isinstance(sample, dict) or hasattr(sample, "keys"):
        if "input_ids" not in sample:
            raise ValueError("sample_data needs an 'input_ids' entry (a tokenizer's output)")
        batch = {k: sample[k] for k in ("input_ids", "attention_mask") if k in sample}
    else:
        raise TypeError(
            f"sample_data must be token ids [batch, seq] or a tokenizer's output, got {type(sample).__name__}"
        )
    if batch["input_ids"].dim() == 1:
        batch = {k: v.unsqueeze(0) for k, v in batch.items()}
    if batch["input_ids"].dtype != torch.long or batch["input_ids"].dim() != 2:
        raise ValueError("sample_data input_ids must be integer token ids of shape [batch, seq]")
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(**batch, use_cache=False).logits.float().cpu()
    finally:
        model.train(was_training)


def _compare(without: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
             batch: dict[str, torch.Tensor]) -> dict[str, float]:
    ids = batch["input_ids"].cpu()
    valid = batch.get("attention_mask", torch.ones_like(ids)).cpu().bool()
    diff = after - before
    logp_before, logp_after = before.log_softmax(-1), after.log_softmax(-1)
    kl = (logp_before.exp() * (logp_before - logp_after)).sum(-1)
    pairs = valid[:, 1:] & valid[:, :-1]

    def loss(logp: torch.Tensor) -> float:
        nll = -logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return float(nll[pairs].mean()) if pairs.any() else math.nan

    return {
        "logits_relative_change": float(diff[valid].norm() / before[valid].norm().clamp_min(1e-12)),
        "logits_max_abs_change": float(diff[valid].abs().max()),
        "kl_divergence": float(kl[valid].mean()),
        "adapter_effect_lost": float(diff[valid].norm() / (before - without)[valid].norm().clamp_min(1e-12)),
        "loss_base": loss(without.log_softmax(-1)),
        "loss_adapter": loss(logp_before),
        "loss_merged": loss(logp_after),
    }


def _masked_module_ids(base: nn.Module) -> set[int]:
    """The decoder operators that were pruned: recorded with sparsity > 0, else holding zeros."""
    recorded = recorded_sparsity(pruning_record(base))
    ids = set()
    for op in decoder_operators(base):
        if op.name in recorded:
            if recorded[op.name] > 0:
                ids.add(id(op.module))
        elif bool((op.stored_weight() == 0).any()):
            ids.add(id(op.module))
    return ids


def _wrapper_chain(layer: nn.Module) -> list[nn.Module]:
    """A tuner layer, and for peft's nested ``ParamWrapper`` s (one per adapted fused expert weight
    of a module) every wrapper inside it, outermost first."""
    chain = [layer]
    while hasattr(chain[-1], "parameter_name") and hasattr(chain[-1].base_layer, "parameter_name"):
        chain.append(chain[-1].base_layer)
    return chain


def _out_in_views(target: nn.Module, parameter: str, weight: torch.Tensor) -> list[torch.Tensor]:
    """``weight`` (a parameter of ``target``) as ``(out, in)`` matrices: one per expert for a fused
    expert weight, the transposed weight of a ``Conv1D``, else the weight itself."""
    if weight.dim() == 3:
        transposed = read_expert_bank("", target, None).layout.transposed
        return [w.t() if transposed else w for w in weight.unbind(0)]
    return [weight.t() if isinstance(target, Conv1D) else weight]


@torch.no_grad()
def merge_lora_keep_sparsity(peft_model: Any, sample_data: Any = None, adapter_names: list[str] | None = None,
                             safe_merge: bool = False) -> tuple[nn.Module, MergeReport]:
    """Merge a LoRA adapter into a pruned model and keep its pruned entries at zero.

    Each adapted module is merged on its own: its pruned entries (the zeros of the base weight
    before the merge) are set back to zero right after, so only one mask exists at a time.
    The result has the same zeros, hence the same pattern and pruning record, as the base.

    Args:
        peft_model: a peft ``PeftModel`` around a pruned model.
        sample_data: optional token ids ``[batch, seq]`` (or a tokenizer's output) on which to
            measure how much the re-masking changed the outputs; three sets of logits (without
            the adapter, with it, merged) are held in memory, so keep it small (a few sequences
            of a few hundred tokens).
        adapter_names: adapters to merge (default the active ones).
        safe_merge: peft's check for NaNs in the merged weights.

    Returns:
        ``(model, report)``: the merged transformers model (adapter removed) and a ``MergeReport``.

    Raises:
        PruningRecordMismatchError: the base weights lost zeros before the merge.

    Plain ``peft_model.merge_and_unload()`` adds the dense ``B @ A`` everywhere and so fills in
    every pruned entry; use this function instead.
    """
    _import_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not (hasattr(peft_model, "get_base_model") and hasattr(peft_model, "unload")):
        raise TypeError(f"expected a peft PeftModel (from apply_lora or peft.get_peft_model), got "
                        f"{type(peft_model).__name__}")
    base = unwrap_model(peft_model)
    check_pruned_weights(base)  # the base must still hold its zeros, or there is nothing to keep
    record = pruning_record(base)
    pattern = parse_pattern((record or {}).get("pattern") or "unstructured")
    device = next(base.parameters()).device
    batch = _sample_batch(sample_data, device) if sample_data is not None else None
    reference = without = None
    if batch is not None:
        vocab = base.get_output_embeddings().weight.shape[0]
        if 3 * batch["input_ids"].numel() * vocab > MAX_SAMPLE_LOGITS:
            raise ValueError(f"sample_data has {batch['input_ids'].numel()} tokens; with a vocabulary of {vocab} "
                             f"the three sets of logits compared exceed {MAX_SAMPLE_LOGITS * 4 / 2**30:.0f} GiB: "
                             "pass fewer or shorter sequences")
        reference = _logits(peft_model, batch)
        with peft_model.disable_adapter():
            without = _logits(peft_model, batch)
    sparsity_before = measure_sparsity(base).overall
    masked_ids = _masked_module_ids(base)
    tuner_names = [name for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)]
    outermost = [n for n in tuner_names if not any(n.startswith(t + ".") for t in tuner_names)]
    merged = masked = reset = 0
    dropped = total = 0.0
    modules = dict(base.named_modules())
    for name in logging.tqdm(outermost, desc="Merging LoRA", unit="module", leave=False):
        for layer in _wrapper_chain(modules[name]):
            target = layer.get_base_layer()
            parameter = getattr(layer, "parameter_name", "weight")  # peft's ParamWrapper: a fused expert weight
            if id(target) not in masked_ids:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                merged += 1
                continue
            original = getattr(target, parameter).detach().clone()
            pruned = original == 0
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            weight = getattr(target, parameter).data
            delta = weight.float() - original.float()
            dropped += float(delta[pruned].pow(2).sum())
            total += float(delta.pow(2).sum())
            reset += int((weight[pruned] != 0).sum())
            weight.masked_fill_(pruned, 0)
            if pattern.is_nm:
                for view in _out_in_views(target, parameter, weight):
                    if not satisfies_nm(view, pattern.n, pattern.m):
                        raise RuntimeError(f"{name} lost the {pattern} pattern while merging; its base weight did "
                                           "not have the pattern before the merge")
            merged += 1
            masked += 1
            del original, pruned, delta
    model = peft_model.unload()
    report = MergeReport(
        merged_modules=merged, masked_modules=masked, entries_reset=reset,
        discarded_update=math.sqrt(dropped / total) if total > 0 else 0.0, pattern=str(pattern),
        sparsity_before=sparsity_before, sparsity_after=measure_sparsity(model).overall,
    )
    if batch is not None and reference is not None and without is not None:
        mask = batch.get("attention_mask")
        report.sample_tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        for key, value in _compare(without, reference, _logits(model, batch), batch).items():
            setattr(report, key, value)
    logger.info("%s", report)
    return model, report
