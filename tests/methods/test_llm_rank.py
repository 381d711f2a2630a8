"""LLM-Rank / MLP-Rank: centrality scores, importance flow between layers, what gets removed."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import SHARED_DATA, tiny_model

from hf_prune import AutoPrunedModelForCausalLM, LLMRankConfig, PruningConfig, evaluate_perplexity
from hf_prune.engine.statistics import InputStatistics, StatKind
from hf_prune.errors import PruningConfigError
from hf_prune.methods.base import LayerContext
from hf_prune.methods.llm_rank import LLMRankPruner
from hf_prune.methods.structured.base import kept_count, top_units
from hf_prune.methods.structured.scores import complement, propagate, removal_loss
from hf_prune.report import count_parameters
from hf_prune.surgery import attention_geometry, layer_sizes
from hf_prune.surgery.geometry import attention_rows, mlp_input_magnitude, mlp_rows, operator
from hf_prune.walker.layout import DecoderLayout


def _kill_neurons(model, dead: torch.Tensor) -> None:
    """Zero every incoming weight (and bias) of the neurons ``dead`` in every layer."""
    layout = DecoderLayout(model)
    with torch.no_grad():
        for index in range(len(layout)):
            width = operator(layout, index, layout.spec.mlp_out).in_features
            rows = mlp_rows(layout, dead, width)
            for name in layout.spec.mlp_in:
                op = operator(layout, index, name)
                op.read_weight()[rows] = 0.0
                if getattr(op.module, "bias", None) is not None:
                    op.module.bias[rows] = 0.0


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "opt"])
@pytest.mark.parametrize("scope,gamma", [("chained", 0.9), ("isolated", 0.9), ("chained", 1.0), ("chained", 0.0)])
def test_dead_neurons_are_removed_first(family, scope, gamma, token_ids):
    model = tiny_model(family)
    layout = DecoderLayout(model)
    width = layer_sizes(layout, 0).mlp_neurons
    dead = torch.randperm(width, generator=torch.Generator().manual_seed(3))[: width // 4]
    _kill_neurons(model, dead)
    model.prune(LLMRankConfig(amount=0.25, scope=scope, gamma=gamma, round_to=1, device="cpu"),
                calibration_data=token_ids)
    for index in range(len(layout)):
        incoming = mlp_input_magnitude(layout, index).sum(dim=1)
        assert incoming.numel() == width - dead.numel()
        assert bool((incoming > 0).all()), f"layer {index} kept a dead neuron"


def test_dead_kv_group_is_removed_first(token_ids):
    model = tiny_model("llama")
    layout = DecoderLayout(model)
    with torch.no_grad():
        for index in range(len(layout)):
            geometry = attention_geometry(layout, index)
            for name, rows in attention_rows(layout, geometry, torch.tensor([1])).items():
                operator(layout, index, name).read_weight()[rows] = 0.0
    model.prune(LLMRankConfig(amount=0.25, heads=True, head_amount=0.5, device="cpu"), calibration_data=token_ids)
    for index in range(len(layout)):
        assert layer_sizes(layout, index).kv_heads == 1
        assert operator(layout, index, "self_attn.k_proj").read_weight().abs().sum(dim=1).min() > 0


def test_propagate_normalizes_columns():
    weight = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 2.0]])
    importance = torch.tensor([0.25, 0.75])
    by_weight = propagate(weight, importance, theta=1.0)
    assert torch.allclose(by_weight, torch.tensor([0.25 * 0.25, 0.25 * 0.75 + 0.75 * 0.5, 0.75 * 0.5]))
    by_edges = propagate(weight, importance, theta=0.0)
    assert torch.allclose(by_edges, torch.tensor([0.125, 0.125 + 0.375, 0.375]))
    mixed = propagate(weight, importance, theta=0.5)
    assert torch.allclose(mixed, 0.5 * by_weight + 0.5 * by_edges)
    assert mixed.sum() == pytest.approx(1.0)
    assert torch.equal(propagate(torch.zeros(3, 2), importance, 0.5), torch.zeros(3))


def _context(model, index: int, hidden_norm: torch.Tensor, neuron_norm: torch.Tensor | None = None) -> LayerContext:
    """A layer context whose MLP statistics say: these input channel norms, these neuron activation norms
    (default: all equal)."""
    layout = DecoderLayout(model)
    prefix = layout.layer_prefix(index)
    mlp_input = InputStatistics(hidden_norm.numel(), StatKind.NORMS, torch.device("cpu"))
    mlp_input.update(hidden_norm.unsqueeze(0))
    neurons = InputStatistics(128, StatKind.NORMS, torch.device("cpu"))
    neurons.update(torch.ones(1, 128) if neuron_norm is None else neuron_norm.unsqueeze(0))
    stats = {f"{prefix}.mlp.gate_proj": mlp_input, f"{prefix}.mlp.up_proj": mlp_input,
             f"{prefix}.mlp.down_proj": neurons}
    return LayerContext(layout, index, layout.layers[index], None, None, [], 0.5, torch.device("cpu"), 1, stats)


def test_chained_importance_flows_from_the_previous_layer():
    """Neurons 0-63 read hidden channels 0-31 only, neurons 64-127 channels 32-63 only (the paper's centrality)."""
    model = tiny_model("llama")
    layout = DecoderLayout(model)
    with torch.no_grad():
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            weight = operator(layout, 1, name).read_weight()
            weight[:64, 32:] = 0.0
            weight[64:, :32] = 0.0
    uniform = torch.ones(64)
    chained = LLMRankPruner(LLMRankConfig(amount=0.5, gamma=1.0, score="centrality"))
    chained.residual = torch.cat([torch.full((32,), 1 / 32), torch.zeros(32)])  # the last MLP wrote channels 0-31
    scores = chained.score_neurons(_context(model, 1, uniform))
    assert scores.sum() == pytest.approx(1.0)
    assert scores[64:].sum() == 0 and bool((scores[:64] > 0).all())

    isolated = LLMRankPruner(LLMRankConfig(amount=0.5, gamma=1.0, scope="isolated", score="centrality"))
    isolated.residual = chained.residual
    scores = isolated.score_neurons(_context(model, 1, uniform))  # starts from its own (uniform) input norms
    assert scores[:64].sum() == pytest.approx(0.5, abs=1e-5)

    mixed = LLMRankPruner(LLMRankConfig(amount=0.5, gamma=0.5, score="centrality"))
    mixed.residual = chained.residual
    scores = mixed.score_neurons(_context(model, 1, uniform))
    assert scores[64:].sum() == pytest.approx(0.25, abs=1e-5)  # half of it is the (equal) activation norms


def test_every_layer_scores_sum_to_one(token_ids, monkeypatch):
    sums: list[float] = []
    residual_sums: list[float] = []
    original = LLMRankPruner.layer_done

    def record(self, context, neurons, scores):
        sums.append(float(scores.sum()))
        original(self, context, neurons, scores)
        residual_sums.append(float(self.residual.sum()))

    monkeypatch.setattr(LLMRankPruner, "layer_done", record)
    tiny_model("mistral").prune(LLMRankConfig(amount=0.5, device="cpu"), calibration_data=token_ids)
    assert sums == pytest.approx([1.0, 1.0]) and residual_sums == pytest.approx([1.0, 1.0])


@pytest.mark.slow
def test_llm_rank_on_smollm2(smollm2, tmp_path):
    dense, tokenizer, _ = smollm2
    model = copy.deepcopy(dense)
    text = (SHARED_DATA / "wiki_sample.txt").read_text()[:8000]
    model.prune(LLMRankConfig(amount=0.2, calibration="c4-sample", num_samples=4, seq_len=128, device="cpu"),
                tokenizer=tokenizer)
    layout = DecoderLayout(model)
    assert {layer_sizes(layout, i).mlp_neurons for i in range(len(layout))} == {kept_count(1536, 0.2, 8)}
    removed = len(layout) * (1536 - 1232) * 3 * 576
    assert count_parameters(model) == count_parameters(dense) - removed
    dense_ppl = evaluate_perplexity(dense, tokenizer, text, 128, max_windows=2)
    pruned_ppl = evaluate_perplexity(model, tokenizer, text, 128, max_windows=2)
    assert pruned_ppl < 3 * dense_ppl
    probe = tokenizer("Pruning makes models", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(probe).logits
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, expected)


def _plant_loud_neuron(model, neuron: int, input_scale: float = 0.3, output_scale: float = 1000.0) -> None:
    """Make ``neuron`` of every layer read weakly (small gate/up rows) but write loudly (large down column):
    a small activation that carries most of the MLP's output, like a massive-activation neuron."""
    layout = DecoderLayout(model)
    with torch.no_grad():
        for index in range(len(layout)):
            for name in layout.spec.mlp_in:
                operator(layout, index, name).read_weight()[neuron] *= input_scale
            operator(layout, index, layout.spec.mlp_out).read_weight()[:, neuron] *= output_scale


def _keeps_loud_neuron(model) -> list[bool]:
    """Per layer: whether a down-projection column still dwarfs the others (the planted neuron survived)."""
    layout = DecoderLayout(model)
    kept = []
    for index in range(len(layout)):
        norms = operator(layout, index, layout.spec.mlp_out).read_weight().norm(dim=0)
        kept.append(bool(norms.max() > 50 * norms.median()))
    return kept


def test_energy_score_keeps_the_neuron_whose_removal_loses_most(token_ids):
    """The centrality (default and paper) ranks the planted neuron last (weak inputs, small activation) and
    removes it; ``score="energy"`` weights the centrality by the output the neuron adds, keeps it, and stays
    closer to the dense model."""
    dense = tiny_model("llama")
    _plant_loud_neuron(dense, neuron=5)
    with torch.no_grad():
        reference = dense(token_ids).logits
    errors = {}
    for score, gamma in (("energy", 0.9), ("centrality", 0.9), ("centrality", 0.5)):
        model = copy.deepcopy(dense)
        model.prune(LLMRankConfig(amount=0.5, score=score, gamma=gamma, round_to=1, device="cpu"),
                    calibration_data=token_ids)
        with torch.no_grad():
            errors[score, gamma] = (model(token_ids).logits - reference).norm().item()
        assert _keeps_loud_neuron(model) == [score == "energy"] * 2, (score, gamma)
    assert errors["energy", 0.9] < min(errors["centrality", 0.9], errors["centrality", 0.5])


def test_default_gamma_ranks_by_activation_where_the_flow_disagrees():
    """Neurons 0-63 are active four times as much as 64-127 (equal down columns: removing one of them loses four
    times the output), while 64-127 have twice the incoming weight. The paper's gamma 0.9 lets the
    column-normalized flow decide and keeps 64-127; the default 0.5 keeps 0-63."""
    model = tiny_model("llama")
    layout = DecoderLayout(model)
    signs = torch.randn(128, 64, generator=torch.Generator().manual_seed(0)).sign()
    magnitude = torch.cat([torch.ones(64, 1), torch.full((64, 1), 2.0)])
    with torch.no_grad():
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            operator(layout, 1, name).read_weight().copy_(signs * magnitude)
    context = _context(model, 1, torch.ones(64), torch.cat([torch.full((64,), 4.0), torch.ones(64)]))
    kept = {gamma: top_units(LLMRankPruner(LLMRankConfig(gamma=gamma)).score_neurons(context), 64)
            for gamma in (0.5, 0.9)}
    assert torch.equal(kept[0.5], torch.arange(64))
    assert torch.equal(kept[0.9], torch.arange(64, 128))


def test_energy_score_is_centrality_times_output_norm():
    model = tiny_model("llama")
    layout = DecoderLayout(model)
    down = operator(layout, 1, layout.spec.mlp_out).read_weight()
    with torch.no_grad():
        down[:, :64] *= 3.0  # neurons 0-63 write three times as loud; activations and inputs unchanged
    context = _context(model, 1, torch.ones(64))
    centrality = LLMRankPruner(LLMRankConfig(gamma=0.5)).score_neurons(context)
    energy = LLMRankPruner(LLMRankConfig(gamma=0.5, score="energy")).score_neurons(context)
    expected = centrality * down.norm(dim=0)
    assert energy.sum() == pytest.approx(1.0)
    assert torch.allclose(energy, expected / expected.sum(), atol=1e-7)


def test_score_and_gamma_fields_are_validated_and_round_trip():
    default = LLMRankConfig()
    assert (default.score, default.gamma, default.theta) == ("centrality", "auto", 0.5)
    assert default.gamma_candidates == [0.0, 0.25, 0.5, 0.75, 0.9]
    with pytest.raises(PruningConfigError, match="score"):
        LLMRankConfig(score="pagerank")
    with pytest.raises(PruningConfigError, match="'auto'"):
        LLMRankConfig(gamma="best")
    with pytest.raises(PruningConfigError, match="gamma_candidates"):
        LLMRankConfig(gamma_candidates=[0.5, 1.5])
    with pytest.raises(PruningConfigError, match="gamma_candidates"):
        LLMRankConfig(gamma_candidates=[])
    with pytest.raises(PruningConfigError, match="gamma"):
        LLMRankConfig(gamma=-0.1)
    config = PruningConfig.from_dict({"method": "llm-rank", "score": "energy", "gamma": 0.9})
    assert isinstance(config, LLMRankConfig) and (config.score, config.gamma) == ("energy", 0.9)
    assert PruningConfig.from_dict(config.to_dict()).score == "energy"
    auto = PruningConfig.from_dict(LLMRankConfig(gamma_candidates=[0, 1]).to_dict())
    assert (auto.gamma, auto.gamma_candidates) == ("auto", [0.0, 1.0])


def test_removal_loss_is_the_output_lost():
    generator = torch.Generator().manual_seed(0)
    weight, inputs = torch.randn(6, 10, generator=generator), torch.randn(50, 10, generator=generator)
    removed = torch.tensor([1, 4, 7])
    kept_only = inputs.clone()
    kept_only[:, removed] = 0.0
    expected = (inputs @ weight.T - kept_only @ weight.T).square().sum()
    assert removal_loss(weight, inputs.T @ inputs, removed) == pytest.approx(float(expected), rel=1e-5)
    assert removal_loss(weight, inputs.T @ inputs, torch.tensor([], dtype=torch.long)) == 0.0
    assert torch.equal(complement(torch.tensor([0, 3]), 5), torch.tensor([1, 2, 4]))


def _gram_context(model, index: int, neuron_activations: torch.Tensor) -> LayerContext:
    """A layer context with uniform input norms and a Gram matrix of ``down_proj``'s input."""
    context = _context(model, index, torch.ones(64))
    gram = InputStatistics(neuron_activations.shape[1], StatKind.GRAM, torch.device("cpu"))
    gram.update(neuron_activations)
    context.stats[f"{context.layout.layer_prefix(index)}.mlp.down_proj"] = gram
    return context


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_gamma_loses_the_least_output_among_its_candidates(seed):
    """Flow and activation disagree on random weights with neurons of uneven loudness: whatever γ the layer takes,
    its kept neurons lose no more output than those of any fixed candidate γ, activation norm (γ = 0) included."""
    model = tiny_model("llama")
    layout = DecoderLayout(model)
    generator = torch.Generator().manual_seed(seed)
    activations = torch.randn(200, 128, generator=generator) * torch.rand(128, generator=generator).square()
    activations[:, :16] += torch.randn(200, 1, generator=generator)  # correlated neurons: the Gram is not diagonal
    with torch.no_grad():
        operator(layout, 1, "mlp.down_proj").read_weight().mul_(torch.rand(1, 128, generator=generator) * 3)
    weight = operator(layout, 1, "mlp.down_proj").read_weight()
    gram = activations.T @ activations
    context = _gram_context(model, 1, activations)
    keep = kept_count(128, 0.5, 8)

    def loss(pruner):
        return removal_loss(weight, gram, complement(top_units(pruner.score_neurons(context), keep), 128))

    fixed = {gamma: loss(LLMRankPruner(LLMRankConfig(amount=0.5, gamma=gamma)))
             for gamma in (0.0, 0.25, 0.5, 0.75, 0.9)}
    auto = LLMRankPruner(LLMRankConfig(amount=0.5))
    chosen = loss(auto)
    assert auto.chosen_gammas[0] in fixed and len(set(fixed.values())) > 2  # the choice matters
    assert chosen == pytest.approx(min(fixed.values()))
    assert chosen == pytest.approx(fixed[auto.chosen_gammas[0]])
    one = LLMRankPruner(LLMRankConfig(amount=0.5, gamma_candidates=[0.9]))
    assert loss(one) == pytest.approx(fixed[0.9]) and one.chosen_gammas == [0.9]


def test_auto_gamma_prunes_neurons_and_heads_end_to_end(token_ids, monkeypatch):
    chosen: list[list[float]] = []
    original = LLMRankPruner.finish_model

    def record(self, context):
        chosen.append(list(self.chosen_gammas))
        return original(self, context)

    monkeypatch.setattr(LLMRankPruner, "finish_model", record)
    model = tiny_model("llama")
    model.prune(LLMRankConfig(amount=0.25, heads=True, head_amount=0.5, device="cpu"), calibration_data=token_ids)
    layout = DecoderLayout(model)
    assert len(chosen[0]) == len(layout) and set(chosen[0]) <= set(LLMRankConfig().gamma_candidates)
    for index in range(len(layout)):
        assert layer_sizes(layout, index).kv_heads == 1
        assert layer_sizes(layout, index).mlp_neurons == kept_count(128, 0.25, 8)
    with torch.no_grad():
        assert torch.isfinite(model(token_ids).logits).all()
