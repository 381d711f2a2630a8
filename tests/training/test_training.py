"""Fine-tuning pruned models: the zeros survive Trainer, AdamW and LoRA merges."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, tiny_model
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_prune import AutoPrunedModelForCausalLM, PruningRecordMismatchError, WandaConfig
from hf_prune.methods.patterns import satisfies_nm
from hf_prune.training.callback import SparsityCallback, prepare_for_training
from hf_prune.training.masks import SparsityMasks
from hf_prune.walker.layout import decoder_operators

peft = pytest.importorskip("peft")
from hf_prune.training.lora import apply_lora, merge_lora_keep_sparsity  # noqa: E402


def pruned_model(token_ids, family="llama", pattern="unstructured", targets=None):
    model = tiny_model(family)
    config = WandaConfig(sparsity=None if ":" in pattern else 0.5, pattern=pattern, device="cpu", num_samples=8,
                         seq_len=32, targets=targets)
    model.prune(config, calibration_data=token_ids)
    return model


def dataset(count=16, seq_len=32, seed=2):
    """A learnable sequence set: a few repeated token patterns, so the loss can go down fast."""
    gen = torch.Generator().manual_seed(seed)
    motifs = torch.randint(0, VOCAB, (4, seq_len), generator=gen)
    rows = motifs[torch.randint(0, 4, (count,), generator=gen)]
    return [{"input_ids": row, "labels": row.clone()} for row in rows]


def train(model, tmp_path, callbacks, steps=8, grad_accum=2, **overrides):
    args = dict(output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to=[], max_steps=steps,
                per_device_train_batch_size=4, gradient_accumulation_steps=grad_accum, learning_rate=5e-3,
                weight_decay=0.1, max_grad_norm=1.0, logging_steps=1, save_strategy="no", disable_tqdm=True,
                seed=0)
    args.update(overrides)
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=dataset(), callbacks=callbacks)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def pruned_positions(model):
    return {op.name: op.module.weight.detach() == 0 for op in decoder_operators(model)}


def snapshot(model):
    return {op.name: op.module.weight.detach().clone() for op in decoder_operators(model)}


def assert_zeros_kept(model, positions):
    ops = {op.name: op for op in decoder_operators(model)}
    for name, pruned in positions.items():
        assert int((ops[name].module.weight.detach()[pruned] != 0).sum()) == 0, name


@pytest.mark.parametrize("mask_in_backward", [True, False])
def test_trainer_keeps_unstructured_zeros(token_ids, tmp_path, mask_in_backward):
    model = pruned_model(token_ids)
    positions, before = pruned_positions(model), snapshot(model)
    callback = SparsityCallback(model, mask_in_backward=mask_in_backward)
    assert callback.masks.memory_bytes == sum(p.numel() for p in positions.values())  # one bool per weight entry
    losses = train(model, tmp_path, [callback])
    assert_zeros_kept(model, positions)
    assert model.pruning_report().overall == pytest.approx(0.5, abs=1e-6)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    moved = sum(int((op.module.weight.detach() != before[op.name]).sum()) for op in decoder_operators(model))
    assert moved > 0.4 * sum(p.numel() for p in positions.values())  # the kept weights did train
    assert callback.steps == 8 and callback.seconds > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("store_nm", [False, True])
def test_trainer_keeps_nm_pattern(token_ids, tmp_path, family, store_nm):
    model = pruned_model(token_ids, family, "2:4")
    positions = pruned_positions(model)
    callback = prepare_for_training(model, store_nm=store_nm)
    assert (callback.masks.memory_bytes > 0) == store_nm  # recomputed N:M masks store nothing
    losses = train(model, tmp_path, [callback], steps=6)
    assert_zeros_kept(model, positions)
    for op in decoder_operators(model):
        assert satisfies_nm(op.read_weight(), 2, 4), op.name
    assert sum(losses[-2:]) < sum(losses[:2]), losses


def test_without_the_callback_the_zeros_are_lost(token_ids, tmp_path):
    model = pruned_model(token_ids, pattern="2:4")
    train(model, tmp_path, [], steps=2)
    assert model.pruning_report().overall < 0.1
    assert not any(satisfies_nm(op.read_weight(), 2, 4) for op in decoder_operators(model))
    with pytest.raises(PruningRecordMismatchError, match="SparsityCallback"):
        prepare_for_training(model)


def test_callback_builds_masks_from_the_trainers_model(token_ids, tmp_path):
    model = pruned_model(token_ids, targets=["mlp.*"])
    attention = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        attention[0, 0] = 0.0  # an exact zero in an operator the record says was not pruned
    callback = SparsityCallback()
    positions = pruned_positions(model)
    train(model, tmp_path, [callback], steps=3, grad_accum=1)
    assert {e.name.split(".")[-1] for e in callback.masks.entries} == {"gate_proj", "up_proj", "down_proj"}
    assert_zeros_kept(model, {k: v for k, v in positions.items() if ".mlp." in k})
    assert attention[0, 0] != 0  # not frozen: only pruned operators are masked


def test_gradient_hooks_zero_pruned_gradients_while_accumulating(token_ids):
    model = pruned_model(token_ids)
    batches = [torch.stack([d["input_ids"] for d in dataset(seed=s)[:2]]) for s in (3, 4)]
    reference = copy.deepcopy(model)
    for batch in batches:
        reference(input_ids=batch, labels=batch).loss.backward()
    masks = SparsityMasks.from_model(model)
    masks.register_gradient_hooks()
    for batch in batches:
        model(input_ids=batch, labels=batch).loss.backward()
    masks.remove_gradient_hooks()
    ref_ops = {op.name: op for op in decoder_operators(reference)}
    for op in decoder_operators(model):
        pruned = op.module.weight.detach() == 0
        grad, expected = op.module.weight.grad, ref_ops[op.name].module.weight.grad
        assert int((grad[pruned] != 0).sum()) == 0
        assert int((expected[pruned] != 0).sum()) > 0
        torch.testing.assert_close(grad[~pruned], expected[~pruned])


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_momentum_from_an_earlier_optimizer_state_cannot_revive_zeros(token_ids, pattern):
    """Zero gradients alone are not enough when Adam already has momentum for pruned entries:
    stored masks undo it after the step; recomputed N:M masks need the state cleared once."""
    results = {}
    for use_apply in (False, True):
        model = pruned_model(token_ids, pattern=pattern)
        positions = pruned_positions(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        batch = torch.stack([d["input_ids"] for d in dataset()[:4]])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()  # a dense step: the optimizer state now has momentum everywhere
        optimizer.zero_grad()
        for op in decoder_operators(model):
            op.module.weight.data.masked_fill_(positions[op.name], 0)
        masks = SparsityMasks.from_model(model, pattern=pattern)
        for step in range(2):
            model(input_ids=batch, labels=batch).loss.backward()
            masks.zero_gradients()
            if use_apply and step == 0 and pattern != "unstructured":
                assert masks.clear_optimizer_state(optimizer) == 2 * len(masks)  # exp_avg, exp_avg_sq
            optimizer.step()
            optimizer.zero_grad()
            if use_apply:
                masks.apply()
        results[use_apply] = sum(int((op.module.weight[positions[op.name]] != 0).sum())
                                 for op in decoder_operators(model))
    assert results[False] > 0 and results[True] == 0


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_bf16_keeps_zeros(token_ids, tmp_path, weights):
    """bf16 autocast over float32 weights (Trainer's bf16=True), and plain bfloat16 weights."""
    model = pruned_model(token_ids, pattern="2:4")
    positions = pruned_positions(model)
    dtype = getattr(torch, weights)
    callback = prepare_for_training(model, dtype=dtype)
    train(model, tmp_path, [callback], steps=3, bf16=weights == "float32")
    assert_zeros_kept(model, positions)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == dtype
    assert all(satisfies_nm(op.read_weight(), 2, 4) for op in decoder_operators(model))


@pytest.mark.gpu
def test_fp16_mixed_precision_on_gpu(token_ids, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = pruned_model(token_ids).cuda()
    positions = {k: v.cuda() for k, v in pruned_positions(model).items()}
    train(model, tmp_path, [prepare_for_training(model)], steps=4, fp16=True, use_cpu=False)
    assert_zeros_kept(model, positions)


def test_prepare_for_training_checks_record_and_sets_up(token_ids):
    model = pruned_model(token_ids)
    model.eval()
    callback = prepare_for_training(model, gradient_checkpointing=True)
    assert model.training and model.config.use_cache is False
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert len(callback.masks) == len(list(decoder_operators(model)))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(0.01)
    with pytest.raises(PruningRecordMismatchError, match="down_proj"):
        prepare_for_training(model)


def shrink_mlp(model, keep: int, stale_attributes: bool = False):
    """Structured pruning by hand: keep the first ``keep`` MLP neurons of every layer."""
    for layer in model.model.layers:
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj", "down_proj"):
            old = getattr(mlp, name)
            weight = old.weight.data[:keep] if name != "down_proj" else old.weight.data[:, :keep]
            if stale_attributes:  # the weight shrinks, the Linear's in/out_features do not
                old.weight = nn.Parameter(weight.clone())
            else:
                new = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                new.weight.data.copy_(weight)
                setattr(mlp, name, new)
    model.config.intermediate_size = keep
    return model


@pytest.mark.parametrize("stale_attributes", [False, True])
def test_structurally_shrunk_model_needs_no_mask_and_takes_lora(tmp_path, stale_attributes):
    model = shrink_mlp(tiny_model("llama"), 96, stale_attributes)
    assert len(SparsityMasks.from_model(model)) == 0
    peft_model = apply_lora(model, r=4)
    assert peft_model.base_model.model.model.layers[0].mlp.up_proj.lora_B["default"].weight.shape == (96, 4)
    losses = train(peft_model, tmp_path, [SparsityCallback()], steps=6)
    assert sum(losses[-2:]) < sum(losses[:2])
    merged, report = merge_lora_keep_sparsity(peft_model)
    assert report.masked_modules == 0 and report.merged_modules == 14
    assert merged.model.layers[0].mlp.down_proj.weight.shape == (64, 96)


def lora_trained(token_ids, tmp_path, family="llama"):
    model = pruned_model(token_ids, family, "2:4")
    peft_model = apply_lora(model, r=4)
    callback = prepare_for_training(peft_model)
    assert len(callback.masks) == 0  # the base is frozen: nothing to mask while training
    train(peft_model, tmp_path, [callback], steps=6)
    return peft_model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_merge_keeps_pattern_where_plain_merge_does_not(token_ids, tmp_path, family):
    peft_model = lora_trained(token_ids, tmp_path, family)
    base_zeros = {op.name: op.module.weight.detach() == 0 for op in decoder_operators(peft_model)}

    plain = copy.deepcopy(peft_model).merge_and_unload()
    assert plain.pruning_report().overall < 0.01  # peft's merge fills every zero in
    assert not any(satisfies_nm(op.read_weight(), 2, 4) for op in decoder_operators(plain))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(PruningRecordMismatchError):
        AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "plain")

    sample = torch.stack([d["input_ids"] for d in dataset(seed=5)[:2]])
    merged, report = merge_lora_keep_sparsity(peft_model, sample_data=sample)
    assert not hasattr(merged, "peft_config")
    assert_zeros_kept(merged, base_zeros)
    for op in decoder_operators(merged):
        assert satisfies_nm(op.read_weight(), 2, 4)
        assert not bool((op.module.weight[~base_zeros[op.name]] == 0).any())  # kept entries got the update
    assert report.sparsity_before == report.sparsity_after == pytest.approx(0.5)
    assert report.entries_reset == sum(int(z.sum()) for z in base_zeros.values())
    assert 0 < report.discarded_update < 1
    assert report.sample_tokens == sample.numel()
    assert 0 < report.logits_relative_change < 1 and report.kl_divergence >= 0
    with torch.no_grad():
        loss = merged.eval()(input_ids=sample, labels=sample).loss.item()
    assert report.loss_merged == pytest.approx(loss, rel=1e-4)
    assert "set back to zero" in str(report)

    merged.save_pretrained(tmp_path / "merged")
    again = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "merged")  # the record still holds
    assert again.pruning_report().overall == pytest.approx(0.5)


def test_merging_an_untrained_adapter_changes_nothing(token_ids):
    model = pruned_model(token_ids)
    expected = snapshot(model)
    sample = torch.stack([d["input_ids"] for d in dataset()[:2]])
    merged, report = merge_lora_keep_sparsity(apply_lora(model, r=4), sample_data=sample)
    for op in decoder_operators(merged):
        torch.testing.assert_close(op.module.weight.detach(), expected[op.name], rtol=0, atol=0)
    assert report.entries_reset == 0 and report.discarded_update == 0.0
    assert report.logits_relative_change == 0.0 and report.loss_adapter == report.loss_merged


def test_merge_rejects_a_plain_model(token_ids):
    with pytest.raises(TypeError, match="PeftModel"):
        merge_lora_keep_sparsity(pruned_model(token_ids))


def test_merge_refuses_a_base_that_lost_its_zeros(token_ids):
    peft_model = apply_lora(pruned_model(token_ids, pattern="2:4"), r=4)
    with torch.no_grad():
        peft_model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.add_(0.01)
    with pytest.raises(PruningRecordMismatchError, match="up_proj"):
        merge_lora_keep_sparsity(peft_model)
