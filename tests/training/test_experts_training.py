"""Fine-tuning pruned mixture-of-experts models: fused expert weights are not nn.Linear, and their
zeros must survive Trainer and LoRA merges too."""

from __future__ import annotations

import copy

import pytest
import torch
from test_training import dataset, train
from tiny_models import tiny_model

from hf_prune import AutoPrunedModelForCausalLM, WandaConfig
from hf_prune.methods.patterns import satisfies_nm
from hf_prune.training.callback import prepare_for_training
from hf_prune.training.masks import decoder_operators

peft = pytest.importorskip("peft")
from hf_prune.training.lora import apply_lora, merge_lora_keep_sparsity  # noqa: E402


def _pruned(token_ids, family: str, pattern: str):
    model = tiny_model(family)
    model.prune(WandaConfig(sparsity=None if ":" in pattern else 0.5, pattern=pattern, device="cpu"),
                calibration_data=token_ids)
    return model


def _expert_zeros(model) -> dict[str, torch.Tensor]:
    return {op.name: op.read_weight().detach() == 0 for op in decoder_operators(model) if op.kind == "expert"}


@pytest.mark.parametrize("family,pattern", [("mixtral", "unstructured"), ("gpt_oss", "2:4")])
def test_trainer_keeps_expert_zeros(token_ids, tmp_path, family, pattern):
    model = _pruned(token_ids, family, pattern)
    zeros = _expert_zeros(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "experts" in name}
    callback = prepare_for_training(model)
    assert {e.expert for e in callback.masks.entries if e.expert is not None} == {0, 1, 2, 3}
    train(model, tmp_path, [callback], steps=4)
    ops = {op.name: op for op in decoder_operators(model)}
    for name, pruned in zeros.items():
        weight = ops[name].read_weight().detach()
        assert int((weight[pruned] != 0).sum()) == 0, name
        if pattern == "2:4":
            assert satisfies_nm(weight, 2, 4), name
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters() if n in before)
    assert moved > 0.3 * sum(int((~z).sum()) for z in zeros.values())  # the kept expert weights trained

    plain = _pruned(token_ids, family, pattern)
    train(plain, tmp_path, [], steps=2)  # without the callback the optimizer fills expert zeros in
    assert sum(int((op.read_weight() == 0).sum()) for op in decoder_operators(plain) if op.kind == "expert") < \
        0.1 * sum(int(z.sum()) for z in zeros.values())


def test_lora_on_fused_experts_merges_without_losing_zeros(token_ids, tmp_path):
    model = _pruned(token_ids, "mixtral", "2:4")
    zeros = _expert_zeros(model)
    peft_model = apply_lora(model, r=4)
    assert peft_model.peft_config["default"].target_parameters  # the experts got adapters too
    train(peft_model, tmp_path, [prepare_for_training(peft_model)], steps=4)

    plain = copy.deepcopy(peft_model).merge_and_unload()
    assert sum(int((op.read_weight() == 0).sum()) for op in decoder_operators(plain) if op.kind == "expert") == 0

    sample = torch.stack([d["input_ids"] for d in dataset(seed=5)[:2]])
    merged, report = merge_lora_keep_sparsity(peft_model, sample_data=sample)
    ops = {op.name: op for op in decoder_operators(merged)}
    for name, pruned in zeros.items():
        weight = ops[name].read_weight()
        assert torch.equal(weight == 0, pruned), name
        assert satisfies_nm(weight, 2, 4), name
    assert report.sparsity_before == report.sparsity_after
    assert report.masked_modules > len(ops) // 8  # Linears and the two fused expert weights of each layer
    merged.save_pretrained(tmp_path / "merged")
    again = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "merged")  # the record still holds
    assert again.pruning_report().overall == pytest.approx(merged.pruning_report().overall)
