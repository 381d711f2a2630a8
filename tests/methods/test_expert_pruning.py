"""Expert pruning (REAP): which experts go, the shapes left, the standard checkpoint, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB, MissingFamily, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from hf_prune import AutoPrunedModelForCausalLM, ExpertPruningConfig, PruningConfig
from hf_prune.errors import PruningConfigError, PruningRecordError, UnsupportedArchitectureError
from hf_prune.methods.experts import choose_experts
from hf_prune.surgery.experts import find_router
from hf_prune.walker.layout import DecoderLayout

#: family -> the config.json field holding the routed-expert count (as the README lists them)
FIELDS = {"mixtral": "num_local_experts", "qwen3_moe": "num_local_experts", "olmoe": "num_experts",
          "gpt_oss": "num_local_experts", "llama4_text": "num_local_experts", "qwen3_next": "num_experts",
          "granitemoehybrid": "num_local_experts"}
FAMILIES = list(FIELDS)


def _model(family: str, seed: int = 0, **overrides):
    try:
        config = tiny_config(family)
    except MissingFamily as err:
        pytest.skip(str(err))
    if overrides:
        config = type(config).from_dict({**config.to_dict(), **overrides})
    torch.manual_seed(seed)
    return AutoPrunedModelForCausalLM.from_config(config).eval()


def _deepseek_grouped():
    """DeepSeek-V3 with 8 routed experts in 2 router groups (topk_group=1, 2 experts per token)."""
    return _model("deepseek_v3", n_routed_experts=8, n_group=2, topk_group=1)


def _banks(model):
    layout = DecoderLayout(model)
    return [(index, bank) for index in range(len(layout)) for bank in layout.expert_banks(index)], layout


def _probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _check_shapes(model, kept: int) -> None:
    banks, layout = _banks(model)
    assert banks
    for index, bank in banks:
        for name, param in bank.module.named_parameters(recurse=False):
            assert param.shape[0] == kept, (index, name, tuple(param.shape))
        _, router = find_router(layout, index, bank)
        assert router.weight.shape == (kept, layout.hidden_size)
        for name, tensor in [*router.named_parameters(recurse=False), *router.named_buffers(recurse=False)]:
            assert tensor.shape[0] == kept, (index, name)
        for module in (bank.module, router):
            for attr in ("num_experts", "num_local_experts"):
                if isinstance(getattr(module, attr, None), int):
                    assert getattr(module, attr) == kept


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_loads_in_plain_transformers_with_the_same_logits(family, token_ids, tmp_path):
    model = _model(family)
    field_before = json.loads(model.config.to_json_string())
    model.prune(ExpertPruningConfig(amount=0.5, device="cpu"), calibration_data=token_ids)
    _check_shapes(model, 2)
    record = model.config.pruning_config["removed_experts"]
    assert record["experts_before"] == 4 and record["experts_after"] == 2
    assert record["config_field"] == FIELDS[family] and field_before[FIELDS[family]] == 4
    assert getattr(model.config, record["config_field"]) == 2
    assert record["parameters_after"] < record["parameters_before"]
    for layer in record["layers"]:
        assert len(layer["removed"]) == 2 and len(layer["tokens"]) == 4 and len(layer["scores"]) == 4
    with torch.no_grad():
        expected = model(_probe()).logits
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved[record["config_field"]] == 2
    assert saved["pruning_config"]["removed_experts"] == record
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(model, type(plain))  # the family's own class, built from the config alone
    _check_shapes(plain, 2)
    with torch.no_grad():
        torch.testing.assert_close(plain(_probe()).logits, expected, atol=1e-5, rtol=0)
    reloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_probe()).logits, expected, atol=1e-5, rtol=0)


def test_router_that_sends_every_token_to_two_experts_keeps_them(token_ids):
    model = _model("gpt_oss")  # its router has a bias: zero weights and this bias route every token to 1 and 3
    banks, layout = _banks(model)
    for index, bank in banks:
        _, router = find_router(layout, index, bank)
        with torch.no_grad():
            router.weight.zero_()
            router.bias.copy_(torch.tensor([-20.0, 3.0, -20.0, 2.0]))
    for score in ("reap", "frequency"):
        pruned = _model("gpt_oss")
        pruned.load_state_dict(model.state_dict())
        pruned.prune(ExpertPruningConfig(num_experts_to_keep=2, score=score, device="cpu"), calibration_data=token_ids)
        record = pruned.config.pruning_config["removed_experts"]
        assert [layer["removed"] for layer in record["layers"]] == [[0, 2], [0, 2]], score
        for layer in record["layers"]:
            assert layer["tokens"][0] == layer["tokens"][2] == 0
            assert layer["tokens"][1] == layer["tokens"][3] == token_ids.numel()
        _, kept_router = find_router(DecoderLayout(pruned), 0, _banks(pruned)[0][0][1])
        torch.testing.assert_close(kept_router.bias.data, torch.tensor([3.0, 2.0]))


def test_reap_ranks_by_gate_times_output_norm_not_by_frequency(token_ids):
    model = _model("mixtral")
    banks, _ = _banks(model)
    for _, bank in banks:  # experts 1 and 2 produce (almost) nothing, however often they are chosen
        with torch.no_grad():
            bank.module.down_proj[1].zero_()
            bank.module.down_proj[2].mul_(1e-4)
    model.prune(ExpertPruningConfig(num_experts_to_keep=2, device="cpu"), calibration_data=token_ids)
    record = model.config.pruning_config["removed_experts"]
    for layer in record["layers"]:
        assert layer["removed"] == [1, 2]
        assert layer["scores"][1] == 0 and layer["tokens"][1] > 0


def test_kept_experts_keep_their_weights_and_router_rows(token_ids):
    model = _model("qwen3_moe")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = model.prune(ExpertPruningConfig(amount=0.5, device="cpu"), calibration_data=token_ids)
    assert report.summary().startswith("routed experts 2/4 per MoE layer, parameters ")
    assert "sparsity" not in report.summary() and "expert pruning: routed experts 2/4" in str(report)
    for layer in model.config.pruning_config["removed_experts"]["layers"]:
        kept = [e for e in range(4) if e not in layer["removed"]]
        prefix = layer["module"].rpartition(".")[0]
        params = dict(model.named_parameters())
        for name in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
            torch.testing.assert_close(params[f"{prefix}.{name}"].data, before[f"{prefix}.{name}"][kept])


def test_deepseek_group_routing_removes_as_many_experts_from_every_group(token_ids, tmp_path):
    model = _deepseek_grouped()
    banks, layout = _banks(model)
    for index, bank in banks:
        _, router = find_router(layout, index, bank)
        router.e_score_correction_bias.copy_(torch.arange(8, dtype=torch.float32))
    model.prune(ExpertPruningConfig(amount=0.25, device="cpu"), calibration_data=token_ids)
    assert model.config.n_routed_experts == 6 and model.config.n_group == 2
    record = model.config.pruning_config["removed_experts"]
    assert record["config_field"] == "n_routed_experts" and record["layers"]
    for layer in record["layers"]:
        removed = layer["removed"]
        assert len(removed) == 2 and sum(e < 4 for e in removed) == 1  # one from each group of four
    _check_shapes(model, 6)
    banks, layout = _banks(model)
    index, bank = banks[0]
    _, router = find_router(layout, index, bank)
    kept = [e for e in range(8) if e not in record["layers"][0]["removed"]]
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor(kept, dtype=torch.float32))
    with torch.no_grad():
        expected = model(_probe()).logits
    model.save_pretrained(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(_probe()).logits, expected, atol=1e-5, rtol=0)


def test_choose_experts_breaks_ties_by_index_and_respects_groups():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 5.0, 1.0, 2.0, 2.0])
    assert choose_experts(scores, 3) == [1, 2, 4]
    assert choose_experts(scores, 4, groups=2) == [1, 2, 4, 6]


@pytest.mark.parametrize(("kwargs", "field", "message"), [
    (dict(amount=1.0), "amount", "in \\[0, 1\\)"),
    (dict(amount=-0.1), "amount", "in \\[0, 1\\)"),
    (dict(amount=0.5, num_experts_to_keep=2), "amount", "not both"),
    (dict(num_experts_to_keep=0), "num_experts_to_keep", "positive"),
    (dict(score="gate"), "score", "reap, frequency"),
    (dict(pattern="2:4"), "pattern", "whole experts"),
    (dict(targets=["mlp.*"]), "targets", "leave targets unset"),
    (dict(owl=True), "owl", "owl"),
    (dict(amount=0.5, sparsity=0.3), "amount", "differ"),
])
def test_bad_settings_are_refused(kwargs, field, message):
    with pytest.raises(PruningConfigError, match=message) as info:
        ExpertPruningConfig(device="cpu", **kwargs)
    assert info.value.field == field


def test_config_round_trips_through_the_record():
    config = ExpertPruningConfig(num_experts_to_keep=3, score="frequency", device="cpu")
    assert PruningConfig.from_dict(json.loads(json.dumps(config.to_dict()))).to_dict() == config.to_dict()


def test_dense_model_is_refused_naming_what_was_found(token_ids):
    model = tiny_model("llama")
    with pytest.raises(UnsupportedArchitectureError, match="no stacked routed-expert weights.*LlamaMLP"):
        model.prune(ExpertPruningConfig(device="cpu"), calibration_data=token_ids)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(num_experts_to_keep=1), "num_experts_per_tok"),
    (dict(num_experts_to_keep=5), "exceeds the model's 4 routed experts"),
    (dict(amount=0.7), "num_experts_per_tok"),
    (dict(amount=0.9), "would remove all 4 routed experts"),
])
def test_counts_the_model_cannot_take_are_refused_before_calibration(kwargs, message):
    model = _model("mixtral")
    with pytest.raises(PruningConfigError, match=message):
        model.prune(ExpertPruningConfig(device="cpu", **kwargs), calibration_data=None)  # before any data is read


def test_group_routing_needs_equal_removals_per_group():
    model = _deepseek_grouped()
    with pytest.raises(PruningConfigError, match="multiple of 2"):
        model.prune(ExpertPruningConfig(num_experts_to_keep=5, device="cpu"), calibration_data=None)
    with pytest.raises(PruningConfigError, match="too few"):
        model.prune(ExpertPruningConfig(num_experts_to_keep=2, device="cpu"), calibration_data=None)


def test_card_lists_the_removed_experts_and_the_runtimes(token_ids, tmp_path):
    model = _model("mixtral")
    model.prune(ExpertPruningConfig(amount=0.5, device="cpu"), calibration_data=token_ids)
    model.save_pretrained(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    record = model.config.pruning_config["removed_experts"]
    assert "whole routed experts were removed with their router rows (2 of 4" in card
    assert "| routed experts per mixture-of-experts layer (`num_local_experts`) | 4 | 2 |" in card
    assert f"{record['parameters_before']:,}" in card and f"{record['parameters_after']:,}" in card
    first = record["layers"][0]
    assert f"| 0 | 2 / 4 | {', '.join(str(e) for e in first['removed'])} |" in card
    assert "| transformers (`AutoModelForCausalLM`) | yes |" in card  # what the tests above measure
    # Mixtral: vLLM's test does not serve it
    assert "| vLLM | yes (expected: it reads the kept sizes from config.json; tested only on SmolLM2-135M" in card
    assert ("| llama.cpp (`convert_hf_to_gguf.py`) | yes (tested: its converter turns tiny Mixtral checkpoints with "
            "routed experts removed into GGUF files" in card)  # tests/inference/test_llama_cpp_convert.py
    assert "- structured" in card and "- unstructured" not in card
    assert not (tmp_path / "out" / "sparsity_per_layer.png").exists()


def test_malformed_removed_experts_entry_is_refused(token_ids):
    from hf_prune.checkpoint.record import validate_record

    model = _model("mixtral")
    model.prune(ExpertPruningConfig(amount=0.5, device="cpu"), calibration_data=token_ids)
    record = json.loads(json.dumps(model.config.pruning_config))
    validate_record(record)
    validate_record({**record, "removed_experts": {**record["removed_experts"], "layers": [
        {"layer": 0, "removed": [1], "tokens": [3, 2**40], "scores": [10**400, 0.5]}]}})  # a huge score is a number
    for entry in ("two", {"experts_before": 4}, {"experts_before": 2, "experts_after": 4},
                  {"experts_before": 4, "experts_after": 2, "layers": [{"layer": 0, "removed": [-1]}]},
                  {"experts_before": 4, "experts_after": 2, "layers": [{"layer": 0, "scores": [float("nan")]}]},
                  {"experts_before": 4, "experts_after": 2, "layers": [{"layer": 0, "scores": ["1"]}]},
                  {"experts_before": 4, "experts_after": 2, "layers": "all"},
                  {"experts_before": 4, "experts_after": 2, "parameters_after": 10**400}):
        with pytest.raises(PruningRecordError, match="removed_experts"):
            validate_record({**record, "removed_experts": entry})
