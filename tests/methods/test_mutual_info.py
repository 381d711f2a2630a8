"""Mutual-information pruning: estimators, greedy removal of copies, compensation, end to end."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from hf_prune import AutoPrunedModelForCausalLM, MutualInfoConfig, PruningConfig
from hf_prune.methods.mutual_info.estimators import (
    _renyi2,
    _renyi_spectral,
    _standardized,
    activation_moments,
    gaussian_mutual_information,
    renyi_mutual_information,
)
from hf_prune.methods.mutual_info.method import greedy_removal, output_energy, redundancy, select_redundant
from hf_prune.methods.structured.base import kept_count
from hf_prune.surgery import layer_sizes
from hf_prune.surgery.geometry import mlp_rows, operator
from hf_prune.walker.layout import DecoderLayout

PROBE = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))


def _independent(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    """Independent neurons of mixed shapes (Gaussian, uniform, skewed, bimodal), different scales."""
    g = torch.Generator().manual_seed(seed)
    columns = []
    for j in range(width):
        kind = j % 4
        if kind == 0:
            col = torch.randn(tokens, generator=g)
        elif kind == 1:
            col = torch.rand(tokens, generator=g) * 2 - 1
        elif kind == 2:
            col = torch.randn(tokens, generator=g).exp()
        else:
            col = torch.randn(tokens, generator=g) * 0.3 + torch.randint(0, 2, (tokens,), generator=g) * 2
        columns.append(col * (0.5 + j / width))
    return torch.stack(columns, dim=1)


def _with_copies(tokens: int, seed: int = 0, nonlinear: bool = False) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """24 independent neurons, then 8 copies: 3 exact (scaled), 3 noisy, 2 exact or monotone non-linear."""
    base = _independent(tokens, 24, seed)
    g = torch.Generator().manual_seed(seed + 100)
    sources = [1, 4, 7, 10, 13, 16, 19, 22]
    copies = []
    for k, source in enumerate(sources):
        h = base[:, source]
        if k < 3:
            copies.append(-2.5 * h)
        elif k < 6:
            copies.append(h + 0.02 * h.std() * torch.randn(tokens, generator=g))
        elif nonlinear:
            copies.append(torch.tanh(h / h.std()) + 0.5 * h.std())  # same information, not linear
        else:
            copies.append(h * 3.0 + 1.0)
    x = torch.cat([base, torch.stack(copies, dim=1)], dim=1)
    return x, [(source, 24 + k) for k, source in enumerate(sources)]


def _config(**kwargs) -> MutualInfoConfig:
    return MutualInfoConfig(**{"device": "cpu", "round_to": 1, **kwargs})


@pytest.mark.parametrize("selection", ["redundancy", "weighted"])
@pytest.mark.parametrize("estimator,nonlinear,tokens", [("gaussian", False, 4000), ("renyi", False, 300),
                                                         ("renyi", True, 300)])
def test_copies_are_removed_first(estimator, nonlinear, tokens, selection):
    x, pairs = _with_copies(tokens, nonlinear=nonlinear)
    if selection == "weighted":  # equal output energy for every neuron, so only the information orders them
        x = x / x.square().mean(dim=0).sqrt()
    unit = torch.ones(4, x.shape[1])
    order, _, _ = select_redundant(x, _config(estimator=estimator, selection=selection), len(pairs), unit)
    removed = set(order.tolist())
    assert len(removed) == len(pairs)
    for source, copy in pairs:
        assert len(removed & {source, copy}) == 1, (source, copy, sorted(removed))
    # shuffling the neurons does not change which pairs lose a member
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(2))
    shuffled, _, _ = select_redundant(x[:, perm], _config(estimator=estimator, selection=selection), len(pairs), unit)
    removed = {int(perm[i]) for i in shuffled}
    assert all(len(removed & {source, copy}) == 1 for source, copy in pairs), sorted(removed)


def _massive_pair(tokens: int = 3000) -> torch.Tensor:
    """30 independent unit neurons, then two that fire together (±20% apart) at ~1000x the scale on 1% of tokens."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, 32, generator=g)
    spikes = torch.zeros(tokens)
    spikes[torch.randperm(tokens, generator=g)[: tokens // 100]] = 1000.0
    x[:, 30] = spikes * (1 + 0.2 * torch.randn(tokens, generator=g)) + 0.1 * x[:, 30]
    x[:, 31] = -0.5 * spikes * (1 + 0.2 * torch.randn(tokens, generator=g)) + 0.1 * x[:, 31]
    return x


def test_weighted_selection_keeps_massive_activations():
    """Scale-blind mutual information removes one of two dependent massive neurons; the weighted order keeps both."""
    x = _massive_pair()
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(6))
    paper, moments, _ = select_redundant(x, _config(selection="redundancy"), 4, weight)
    assert int(paper[0]) in {30, 31}
    weighted, _, _ = select_redundant(x, _config(selection="weighted"), 4, weight)
    assert not {30, 31} & set(weighted.tolist())
    energy = output_energy(moments, weight)
    assert energy[weighted].sum() < 1e-3 * energy.sum() < energy[paper].sum()


def test_weighted_selection_needs_the_down_weight():
    with pytest.raises(ValueError, match="down_weight"):
        select_redundant(torch.randn(50, 8), _config(), 2)


def test_constant_neurons_go_before_copies():
    x, pairs = _with_copies(2000)
    x[:, 5] = 3.0
    x[:, 30] = 0.0
    for estimator in ("gaussian", "renyi"):
        order, _, _ = select_redundant(x[:400] if estimator == "renyi" else x,
                                       _config(estimator=estimator, selection="redundancy"), 3)
        assert set(order[:2].tolist()) == {5, 30}
        assert int(order[2]) in {i for pair in pairs for i in pair}


def test_gaussian_estimator_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    factor = torch.randn(6, 6, generator=g)
    factor[1] = factor[0] + 0.05 * factor[1]  # neuron 1 nearly copies neuron 0
    covariance = factor @ factor.T + 0.01 * torch.eye(6)
    chol = torch.linalg.cholesky(covariance.double())
    x = (torch.randn(400_000, 6, generator=g, dtype=torch.float64) @ chol.T + 5.0).float()
    std = covariance.diagonal().sqrt()
    rho = covariance / torch.outer(std, std)
    expected = -0.5 * torch.log1p(-rho.square())
    estimated = gaussian_mutual_information(activation_moments(x))
    off = ~torch.eye(6, dtype=torch.bool)
    assert torch.allclose(estimated[off], expected[off].float(), atol=0.02, rtol=0.01)
    assert estimated[0, 1] > 2.0  # the near copy stands out
    assert torch.equal(estimated, estimated.T)


@pytest.mark.parametrize("alpha", [2.0, 1.5])
def test_renyi_is_invariant_to_scaling_a_neuron(alpha):
    x = _independent(120 if alpha == 2.0 else 40, 6)
    x[:, 5] = x[:, 0] ** 3 + 0.1 * x[:, 1]
    reference = renyi_mutual_information(x, alpha)
    for scale in (8.0, -0.01, 250.0):
        scaled = x.clone()
        scaled[:, 2] *= scale
        scaled[:, 5] *= scale
        assert torch.allclose(renyi_mutual_information(scaled, alpha), reference, atol=1e-4)
    off = ~torch.eye(6, dtype=torch.bool)
    assert reference[off].min() >= -1e-4
    assert reference[0, 5] == reference[off].max()  # the (non-linear) dependent pair


def test_renyi_closed_form_equals_eigenvalues_at_alpha_2():
    x = _independent(48, 7)
    x[:, 6] = x[:, 3].exp()
    z, _ = _standardized(x, "silverman")
    off = ~torch.eye(7, dtype=torch.bool)
    assert torch.allclose(_renyi2(z)[off], _renyi_spectral(z, 2.0)[off], atol=1e-4)


def _naive_greedy(matrix: torch.Tensor, count: int) -> list[int]:
    """Recompute every kept neuron's best redundancy from scratch at each step (the reference)."""
    kept = list(range(matrix.shape[0]))
    finite = torch.where(torch.isfinite(matrix), matrix, 0.0).double()
    order = []
    for _ in range(count):
        best = {i: max((float(matrix[i, j]) for j in kept if j != i), default=-math.inf) for i in kept}
        top = max(best.values())
        tied = [i for i in kept if best[i] >= top - 1e-6 * max(1.0, abs(top))]
        chosen = max(tied, key=lambda i: (float(finite[i, kept].sum()), -i))
        order.append(chosen)
        kept.remove(chosen)
    return order


def test_greedy_running_max_equals_recomputing_everything():
    g = torch.Generator().manual_seed(4)
    values = torch.rand(40, 40, generator=g)
    matrix = (values + values.T) / 2
    matrix[3, 17] = matrix[17, 3] = 5.0
    matrix[8, 9] = matrix[9, 8] = 5.0  # tied pairs
    matrix.fill_diagonal_(float("-inf"))
    assert greedy_removal(matrix, 39).tolist() == _naive_greedy(matrix, 39)
    constant = torch.zeros(40, dtype=torch.bool)
    constant[11] = True
    assert int(greedy_removal(redundancy(matrix.nan_to_num(neginf=0.0), constant), 1)[0]) == 11


def _mlp_outputs(model, calibration: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every layer's MLP module on ``calibration``."""
    layout = DecoderLayout(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for index in range(len(layout)):
        module = layout.submodule(index, layout.spec.mlp_out.rpartition(".")[0])

        def hook(mod, args, out, index=index):
            seen[index] = (args[0].detach(), out.detach())

        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(calibration)
    for handle in handles:
        handle.remove()
    return seen


def _mlp_error(dense, pruned, calibration: torch.Tensor) -> float:
    """Relative error of layer 0's pruned MLP on the dense MLP's calibration inputs."""
    inputs, expected = _mlp_outputs(dense, calibration)[0]
    module = DecoderLayout(pruned).submodule(0, DecoderLayout(pruned).spec.mlp_out.rpartition(".")[0])
    with torch.no_grad():
        got = module(inputs)
    return float((got - expected).norm() / expected.norm())


def _duplicate_neurons(model, sources: torch.Tensor, copies: torch.Tensor) -> None:
    """Make neurons ``copies`` of layer 0 read exactly what ``sources`` read (same activations)."""
    layout = DecoderLayout(model)
    width = operator(layout, 0, layout.spec.mlp_out).in_features
    with torch.no_grad():
        for name in layout.spec.mlp_in:
            op = operator(layout, 0, name)
            weight = op.read_weight()
            weight[mlp_rows(layout, copies, width)] = weight[mlp_rows(layout, sources, width)]
            bias = getattr(op.module, "bias", None)
            if bias is not None:
                bias[mlp_rows(layout, copies, width)] = bias[mlp_rows(layout, sources, width)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compensation_folds_exact_copies_without_error(family, token_ids):
    dense = tiny_model(family)
    width = layer_sizes(DecoderLayout(dense), 0).mlp_neurons
    removed = width - kept_count(width, 0.25, 8)
    sources, copies = torch.arange(removed), torch.arange(removed) + removed
    _duplicate_neurons(dense, sources, copies)
    errors = {}
    for compensate in (True, False):
        model = tiny_model(family)
        model.load_state_dict(dense.state_dict())
        model.prune(_config(amount=0.25, round_to=8, compensate=compensate), calibration_data=token_ids)
        errors[compensate] = _mlp_error(dense, model, token_ids)
    assert errors[True] < 1e-4 < errors[False], errors


@pytest.mark.parametrize("family,estimator", [("llama", "gaussian"), ("gpt_neox", "gaussian"), ("qwen3", "renyi")])
def test_compensation_lowers_mlp_error(family, estimator, token_ids):
    errors = {}
    for compensate in (True, False):
        model = tiny_model(family)
        model.prune(_config(amount=0.5, estimator=estimator, compensate=compensate), calibration_data=token_ids)
        errors[compensate] = _mlp_error(tiny_model(family), model, token_ids)
    assert errors[True] < errors[False], errors


@pytest.mark.parametrize("family,estimator", [("llama", "gaussian"), ("gpt2", "gaussian"), ("opt", "renyi"),
                                              ("phi3", "gaussian")])
def test_end_to_end_shrinks_and_reloads(family, estimator, token_ids, tmp_path):
    model = tiny_model(family)
    layout = DecoderLayout(model)
    widths = [layer_sizes(layout, i).mlp_neurons for i in range(len(layout))]
    model.prune(MutualInfoConfig(amount=0.3, estimator=estimator, device="cpu"), calibration_data=token_ids)
    kept = [layer_sizes(layout, i).mlp_neurons for i in range(len(layout))]
    assert kept == [kept_count(w, 0.3, 8) for w in widths] and all(k < w for k, w in zip(kept, widths))
    record = model.config.pruning_config
    assert record["method"] == "mutual-info" and record["estimator"] == estimator
    assert record["num_tokens"] == (16384 if estimator == "gaussian" else 256)
    assert (record["alpha"], record["bandwidth"], record["compensate"]) == (2.0, "silverman", True)
    assert record["structure"]["mlp_neurons"] == kept and record["structure"]["dense"]["mlp_neurons"] == widths
    with torch.no_grad():
        expected = model(PROBE).logits
    assert torch.isfinite(expected).all()
    model.save_pretrained(tmp_path)
    reloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(PROBE).logits, expected)
    assert isinstance(reloaded.pruning_config, MutualInfoConfig)


def test_sampling_does_not_depend_on_batch_size(token_ids):
    """Batches of 3 samples reach the down projection in pieces; the same tokens are sampled."""
    weights = []
    for batch_size in (None, 3):
        model = tiny_model("mistral")
        model.prune(_config(amount=0.25, num_tokens=100, batch_size=batch_size), calibration_data=token_ids)
        weights.append(operator(DecoderLayout(model), 1, "mlp.down_proj").read_weight().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


def test_config_round_trip_and_errors():
    config = MutualInfoConfig(amount=0.2, estimator="renyi", alpha=1.5, num_tokens=128, bandwidth="scott",
                              compensate=False, selection="redundancy")
    assert PruningConfig.from_dict(config.to_dict()) == config
    assert PruningConfig.from_json_string(config.to_json_string()) == config
    assert MutualInfoConfig().num_tokens == 16384 and MutualInfoConfig(estimator="renyi").num_tokens == 256
    assert MutualInfoConfig(sparsity=0.4).amount == 0.4
    bad = [
        ({"amount": 1.0}, r"must be in \[0, 1\)"),
        ({"amount": -0.1}, r"must be in \[0, 1\)"),
        ({"estimator": "knn"}, "estimator must be"),
        ({"alpha": 0}, "alpha must be"),
        ({"alpha": float("nan")}, "alpha must be"),
        ({"num_tokens": 1}, "num_tokens must be"),
        ({"bandwidth": "fixed"}, "bandwidth must be"),
        ({"compensate": "yes"}, "compensate must be"),
        ({"selection": "energy"}, "selection must be"),
        ({"heads": True}, "MLP neurons only"),
        ({"pattern": "2:4"}, "removes whole neurons"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            MutualInfoConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown field"):
        PruningConfig.from_dict({"method": "mutual-info", "estimater": "gaussian"})
