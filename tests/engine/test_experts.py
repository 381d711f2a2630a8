"""Routed experts calibrated on their own tokens (``engine.experts``)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import MissingFamily, tiny_model

from hf_prune import (
    BarberConfig,
    FISTAConfig,
    MagnitudeConfig,
    SparseGPTConfig,
    UnsupportedOperatorError,
    WandaConfig,
)
from hf_prune.methods.patterns import mask_from_scores, parse_pattern, satisfies_nm
from hf_prune.methods.sparsegpt import SparseGPTPruner
from hf_prune.walker.experts import ExpertBank
from hf_prune.walker.layout import DecoderLayout

EXPERTS = 4
GATES = (0.75, 0.25)


def _model(family: str):
    try:
        return tiny_model(family)
    except MissingFamily as err:
        pytest.skip(str(err))


def _choice(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token t goes to experts (t % 3, another of 0..2) with gates 0.75 and 0.25: expert 3 gets nothing."""
    t = torch.arange(tokens)
    first = t % 3
    second = (first + 1 + (t // 3) % 2) % 3
    return torch.stack([first, second], dim=1), torch.tensor(GATES).expand(tokens, 2)


def _constructed_router(router: torch.nn.Module) -> None:
    def forward(hidden: torch.Tensor):
        flat = hidden.reshape(-1, hidden.shape[-1])
        index, weights = _choice(flat.shape[0])
        logits = torch.zeros(flat.shape[0], EXPERTS)
        return logits, weights.to(flat.dtype), index

    router.forward = forward


class _RecordingSparseGPT(SparseGPTPruner):
    """SparseGPT that keeps the token count and Gram matrix each expert slice was pruned from."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.seen: dict[str, tuple[int, torch.Tensor]] = {}

    def prune_operator(self, op, weight, stats, sparsity):
        if op.expert is not None:
            self.seen[op.name] = (stats.tokens, stats.gram.clone())
        return super().prune_operator(op, weight, stats, sparsity)


@pytest.mark.parametrize("family,router", [("mixtral", "gate"), ("qwen3_moe", "gate"), ("gpt_oss", "router")])
@pytest.mark.parametrize("gate_weighting", [False, True])
def test_constructed_router_each_expert_counts_exactly_its_tokens(family, router, gate_weighting, token_ids,
                                                                 monkeypatch):
    model = _model(family)
    layout = DecoderLayout(model)
    moe_inputs: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(layout.layers):
        _constructed_router(getattr(layer.mlp, router))
        layer.mlp.register_forward_pre_hook(
            lambda module, args, index=index: moe_inputs.setdefault(index, args[0].detach().clone()))
    rows_run = []
    activations = ExpertBank.activations
    monkeypatch.setattr(ExpertBank, "activations",
                        lambda self, expert, x: rows_run.append(x.shape[0]) or activations(self, expert, x))
    dense_expert3 = [layer.mlp.experts.down_proj.detach()[3].clone() for layer in layout.layers]

    config = SparseGPTConfig(sparsity=0.5, device="cpu", expert_gate_weighting=gate_weighting)
    pruner = _RecordingSparseGPT(config)
    monkeypatch.setattr(config, "make_pruner", lambda: pruner)
    model.prune(config, calibration_data=token_ids)

    tokens = token_ids.numel()
    index, weights = _choice(tokens)
    expected = [int((index == e).sum()) for e in range(EXPERTS)]
    assert expected[3] == 0 and sum(expected) == 2 * tokens
    assert sum(rows_run) == 2 * tokens * len(layout)  # each token runs through its 2 experts only, once
    record = model.config.pruning_config["experts"]
    for layer_index in range(len(layout)):
        bank = f"{layout.layer_prefix(layer_index)}.mlp.experts"
        assert record["banks"][bank] == {"tokens": expected, "fallback": [3]}
        x = moe_inputs[layer_index].reshape(tokens, -1).float()
        for expert in range(3):
            token, slot = torch.where(index == expert)
            rows = x[token] * (weights[token, slot].unsqueeze(1) if gate_weighting else 1.0)
            count, gram = pruner.seen[f"{bank}.gate_up_proj.{expert}"]
            assert count == expected[expert]
            torch.testing.assert_close(gram, rows.T @ rows, rtol=1e-4, atol=1e-4)
            assert pruner.seen[f"{bank}.down_proj.{expert}"][0] == expected[expert]
        assert f"{bank}.down_proj.3" not in pruner.seen  # no token: the data-free fallback
        down3 = layout.layers[layer_index].mlp.experts.down_proj.detach()[3]
        dense = dense_expert3[layer_index]
        view = dense.t() if family == "gpt_oss" else dense
        magnitude = view.masked_fill(mask_from_scores(view.abs(), parse_pattern("unstructured"), 0.5), 0.0)
        assert torch.equal(down3.t() if family == "gpt_oss" else down3, magnitude)
    assert record["token_floor"] == 32 and record["gate_weighting"] is gate_weighting


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "llama4_text", "deepseek_v3", "qwen3_next"])
def test_one_pass_outputs_are_the_pruned_models(family, token_ids):
    """The routed forward computes what the experts module computes: the hidden states the pass hands to
    layer 1 equal those of the pruned model run normally."""
    model = _model(family)
    layer = DecoderLayout(model).layers[1]
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone()),
        with_kwargs=True)
    model.prune(WandaConfig(sparsity=0.5, device="cpu"), calibration_data=token_ids)
    with torch.no_grad():
        model(token_ids)
    handle.remove()
    during, after = [s for s in seen if s.shape[0] == token_ids.shape[0]]  # the others: input capture, by sample
    torch.testing.assert_close(during, after, rtol=1e-5, atol=1e-5)


def test_token_floor_falls_back_to_magnitude_and_is_recorded(token_ids, tmp_path):
    model = _model("qwen3_moe")
    dense = {name: p.detach().clone() for name, p in model.named_parameters() if "experts" in name}
    model.prune(WandaConfig(pattern="2:4", device="cpu", expert_token_floor=10**6), calibration_data=token_ids)
    layout = DecoderLayout(model)
    for op in (op for i in range(len(layout)) for op in layout.operators(i) if op.kind == "expert"):
        original = op.as_out_in(op.stored_weight(dense[op.parameter_name]))
        expected = original.masked_fill(mask_from_scores(original.abs(), parse_pattern("2:4"), 0.5), 0.0)
        assert torch.equal(op.read_weight(), expected), op.name
    record = model.config.pruning_config["experts"]
    assert all(entry["fallback"] == [0, 1, 2, 3] for entry in record["banks"].values())
    model.save_pretrained(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "fewer than 1000000 calibration tokens" in card and "model.layers.0.mlp.experts: experts 0, 1, 2, 3" in card
    assert "expert_token_floor=1000000" in card  # the reproduce command keeps the floor
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pruning_config"]["experts"] == record


@pytest.mark.parametrize("config", [
    MagnitudeConfig(pattern="2:4", device="cpu"),
    WandaConfig(sparsity=0.5, owl=True, device="cpu"),
    SparseGPTConfig(sparsity=0.5, batch_size=3, device="cpu"),
    BarberConfig(sparsity=0.5, device="cpu"),
    BarberConfig(pattern="2:4", initial="sparsegpt", device="cpu"),
], ids=["magnitude-2:4", "owl-wanda", "sparsegpt-two-pass", "barber-swaps", "barber-sparsegpt-2:4"])
def test_methods_on_experts(config, token_ids):
    model = _model("deepseek_v3")  # a dense layer, then routed experts beside a shared expert
    model.prune(config, calibration_data=token_ids)
    layout = DecoderLayout(model)
    sparsities = model.config.pruning_config["layer_sparsity"]
    per_module = model.pruning_report().per_module
    for index in range(len(layout)):
        for op in layout.operators(index):
            weight = op.read_weight()
            zeros = (weight == 0).sum(dim=1)
            if config.pattern == "2:4":
                assert satisfies_nm(weight, 2, 4), op.name
            assert torch.all(zeros == int(sparsities[index] * weight.shape[1] + 1e-9)), op.name
    shared = per_module["model.layers.1.mlp.shared_experts.down_proj"]  # pruned like a dense MLP, 32 inputs wide
    assert shared == int(sparsities[1] * 32 + 1e-9) / 32
    if config.owl is not None:
        assert sum(sparsities) / len(sparsities) == pytest.approx(0.5) and sparsities[0] != sparsities[1]


@pytest.mark.parametrize("config,match", [
    (FISTAConfig(sparsity=0.5, device="cpu"), "FISTAPruner cannot prune .*experts.*targets"),
    (BarberConfig(sparsity=0.5, rebuild="gradient", device="cpu"), "rebuild='swaps'"),
])
def test_methods_that_cannot_prune_experts_say_so_before_any_work(config, match, token_ids):
    model = _model("mixtral")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(UnsupportedOperatorError, match=match):
        model.prune(config, calibration_data=token_ids)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    config.targets = ["*self_attn*"]
    model.prune(config, calibration_data=token_ids)  # the attention alone is fine
    assert model.pruning_report().per_module["model.layers.0.self_attn.q_proj"] == pytest.approx(0.5)
