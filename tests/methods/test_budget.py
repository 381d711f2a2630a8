"""The parameter budget (``BudgetConfig``): hits the asked count, keeps the lowest-KL candidate, saves and reloads."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_models import VOCAB, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from hf_prune import AutoPrunedModelForCausalLM, BudgetConfig, PruningConfig
from hf_prune.checkpoint.record import validate_record
from hf_prune.checkpoint.standard_config import saved_config_is_standard
from hf_prune.cli import build_config, main, make_parser
from hf_prune.errors import PruningConfigError, PruningRecordError
from hf_prune.methods.budget.plan import model_copy
from hf_prune.training.distillation import evaluate_kl
from hf_prune.walker.layout import DecoderLayout

PROBE = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
#: names of the embedding and LM-head parameters in the tiny families (excluded from the budget)
EMBEDDINGS = ("embed_tokens", "lm_head", "wte", "wpe")
#: a few mixes of [depth, heads, hidden] that give different shapes on a 3-layer tiny model
MIXES = [[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]]


def _non_embedding(model) -> int:
    """Counted here from parameter names, independently of the library's count."""
    return sum(p.numel() for name, p in model.named_parameters() if not any(e in name for e in EMBEDDINGS))


def _neuron_unit(model, family: str, round_to: int = 8) -> int:
    """Parameters of ``round_to`` MLP neurons in every layer of the pruned model: one rounding unit."""
    layers = model.config.num_hidden_layers
    hidden = model.config.hidden_size
    per_neuron = 2 * hidden + 1 if family == "gpt2" else 3 * hidden  # c_fc row + bias + c_proj column; gate, up, down
    return round_to * layers * per_neuron


def _logits(model):
    with torch.no_grad():
        return model(PROBE).logits


@pytest.fixture
def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("family", "target"), [("llama", 0.6), ("llama", 90_000), ("qwen3", 0.55),
                                                ("gpt2", 90_000)])
def test_hits_the_asked_count_within_one_rounding_unit(family, target, windows):
    model = tiny_model(family, layers=3)
    dense = _non_embedding(model)
    expected = round(target * dense) if isinstance(target, float) else target
    model.prune(BudgetConfig(target_params=target, mixes=MIXES, device="cpu"), calibration_data=windows)
    kept = _non_embedding(model)
    entry = model.config.pruning_config["budget_search"]
    assert (entry["dense_params"], entry["target_params"], entry["kept_params"]) == (dense, expected, kept)
    unit = _neuron_unit(model, family)
    assert entry["rounding_unit"] == unit
    assert abs(kept - expected) <= unit, (kept, expected, unit)
    scored = [c for c in entry["candidates"] if c["kl"] is not None]
    assert len({(c["layers_removed"], c["kv_groups_removed"], c["hidden_size"]) for c in scored}) >= 3
    for candidate in scored:  # every candidate tried was on budget too, within its own rounding unit
        layers, hidden = 3 - candidate["layers_removed"], candidate["hidden_size"]
        unit = 8 * layers * (2 * hidden + 1 if family == "gpt2" else 3 * hidden)
        assert abs(candidate["parameters"] - expected) <= unit, candidate


def test_keeps_the_candidate_with_the_lowest_kl(windows, caplog):
    model = tiny_model("llama", layers=3)
    dense = model_copy(model)
    with caplog.at_level(logging.INFO, logger="hf_prune.methods.budget.method"):
        model.prune(BudgetConfig(target_params=0.6, mixes=MIXES, score_samples=3, device="cpu"),
                    calibration_data=windows)
    entry = model.config.pruning_config["budget_search"]
    kls = [c["kl"] for c in entry["candidates"] if c["kl"] is not None]
    assert len(kls) >= 3 and len(set(kls)) >= 3
    chosen = entry["candidates"][entry["chosen"]]
    assert chosen["kl"] == min(kls)
    # the model is the candidate that was scored: same KL to the dense model on the held-out windows
    assert evaluate_kl(model, dense, windows[-3:]) == pytest.approx(chosen["kl"], abs=2e-6)
    table = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("budget search:"))
    rows = [line for line in table.splitlines()[2:] if "skipped" not in line]
    assert len(rows) == len(entry["candidates"])
    assert sum("<- chosen" in row for row in rows) == 1
    chosen_row = next(row for row in rows if "<- chosen" in row)
    assert f"{chosen['kl']:.6f}" in chosen_row
    logged = [float(row.split()[-1]) for row in rows if "<- chosen" not in row and "same as" not in row]
    assert all(value >= chosen["kl"] - 1e-6 for value in logged)


@pytest.mark.parametrize(("family", "mixes"), [("llama", [[0.5, 0.0, 0.0], [0.25, 0.25, 0.25]]),
                                               ("qwen3", [[0.0, 0.0, 0.5]]), ("gpt2", [[0.0, 0.5, 0.0]])])
def test_result_saves_and_reloads_with_the_same_logits(family, mixes, windows, tmp_path):
    model = tiny_model(family, layers=3)
    config = BudgetConfig(target_params=0.6, mixes=mixes, device="cpu")
    model.prune(config, calibration_data=windows)
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    record = saved["pruning_config"]
    assert record["method"] == "budget" and validate_record(record)
    assert PruningConfig.from_dict(record).to_dict() == config.to_dict()
    card = (tmp_path / "out" / "README.md").read_text()
    chosen = record["budget_search"]["chosen"]
    assert "## Parameter budget search" in card and f"| {chosen} | " in card and "| chosen |" in card
    ours = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.allclose(_logits(ours), expected, atol=1e-5)
    assert ours.pruning_config.target_params == 0.6
    if family == "gpt2":  # head width is n_embd / n_head: removed heads cannot be written in the config
        assert not saved_config_is_standard(saved)
        return
    assert saved_config_is_standard(saved)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.allclose(_logits(plain), expected, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "field", "hint"), [
    (dict(target_params=1.0), "target_params", "ambiguous"),
    (dict(target_params=5e7), "target_params", "pass 50000000"),
    (dict(target_params=0), "target_params", "positive integer count"),
    (dict(target_params=-3), "target_params", "positive integer count"),
    (dict(target_params=0.0), "target_params", "share in (0, 1)"),
    (dict(target_params=True), "target_params", "an integer"),
    (dict(target_params="half"), "target_params", "an integer"),
    (dict(target_params=0.5, amount=0.5), "amount", "not both"),
    (dict(target_params=0.5, sparsity=0.2), "sparsity", "pass only target_params"),
    (dict(amount=1.0), "amount", "[0, 1)"),
    (dict(mixes=[[0.5, 0.5, 0.5]]), "mixes", "sum to at most 1"),
    (dict(mixes=[[0.5, 0.5]]), "mixes", "[depth, heads, hidden]"),
    (dict(mixes=[[0.1, 0.1, 0.1, 0.1, 0.1]]), "mixes", "[depth, heads, hidden, experts]"),
    (dict(mixes=[]), "mixes", "1 to 64"),
    (dict(neuron_method="wanda"), "neuron_method", "structured method"),
    (dict(depth_score="random"), "depth_score", "block-influence"),
    (dict(score_samples=128), "score_samples", "below num_samples"),
    (dict(pattern="2:4"), "pattern", "WandaConfig"),
])
def test_bad_values_name_the_field_and_the_fix(kwargs, field, hint):
    with pytest.raises(PruningConfigError) as err:
        BudgetConfig(**kwargs)
    assert err.value.field == field and hint in str(err.value), str(err.value)


def test_a_target_the_model_cannot_take_is_refused_before_any_pass(windows):
    model = tiny_model("llama")
    for target, hint in ((10**9, "nothing to remove"), (0.999999999, "nothing to remove")):
        with pytest.raises(PruningConfigError, match=hint) as err:
            model.prune(BudgetConfig(target_params=target, device="cpu"), calibration_data=windows)
        assert err.value.field == "target_params"
    assert not getattr(model.config, "pruning_config", None)
    with pytest.raises(PruningConfigError, match="calibration windows") as err:
        model.prune(BudgetConfig(target_params=0.5, mixes=[[0, 0, 0]], device="cpu"), calibration_data=windows[:1])


def test_a_tampered_search_record_is_refused(windows):
    model = tiny_model("llama")
    model.prune(BudgetConfig(target_params=0.7, mixes=[[0, 0, 0]], device="cpu"), calibration_data=windows)
    record = model.config.pruning_config
    validate_record(record)
    for key, value in (("chosen", 5), ("kept_params", -1), ("candidates", [])):
        bad = json.loads(json.dumps(record))
        bad["budget_search"][key] = value
        with pytest.raises(PruningRecordError, match="budget_search"):
            validate_record(bad)


@pytest.mark.parametrize(("flag", "expected"), [("0.7", 0.7), ("90000", 90_000), ("90K", 90_000),
                                                ("1.5M", 1_500_000)])
def test_cli_flag_builds_the_config(flag, expected):
    config = build_config(make_parser().parse_args(["prune", "--target-params", flag]))
    assert isinstance(config, BudgetConfig) and config.target_params == expected
    assert type(config.target_params) is type(expected)


def test_cli_flag_refuses_other_methods_and_ambiguous_values():
    with pytest.raises(SystemExit, match="--method budget"):
        build_config(make_parser().parse_args(["prune", "--method", "wanda", "--target-params", "0.5"]))
    with pytest.raises(PruningConfigError, match="ambiguous"):
        build_config(make_parser().parse_args(["prune", "--target-params", "5e7"]))
    with pytest.raises(SystemExit):  # argparse refuses what is not a number
        make_parser().parse_args(["prune", "--target-params", "lots"])


def test_cli_prunes_to_a_budget(tmp_path, capsys):
    source = save_tiny(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("calibration text for the command line. " * 80)
    out = tmp_path / "out"
    assert main(["prune", "--model", str(source), "--target-params", "0.6", "--param", "mixes=[[0,0,0],[0,0,0.5]]",
                 "--calibration", str(text), "--num-samples", "4", "--seq-len", "32", "--device", "cpu",
                 "--output", str(out), "--json"]) == 0
    printed = capsys.readouterr().out
    assert "pruned with budget (structured, 0.6 of the non-embedding parameters kept)" in printed
    results = json.loads(printed[printed.index("\n{") + 1:])
    search = results["budget_search"]
    assert "budget: " in printed and f"{search['kept_params']:,} of {search['dense_params']:,}" in printed
    assert abs(search["kept_params"] - search["target_params"]) <= search["rounding_unit"]
    assert json.loads((out / "config.json").read_text())["pruning_config"]["budget_search"] == search


def test_hidden_size_candidates_respect_a_config_that_wants_the_heads_to_divide_it(windows):
    """SmolLM2's 9 heads: LlamaConfig refuses a hidden size they do not divide, so the hidden axis moves in steps
    of lcm(round_to, heads) and its candidates are pruned and scored, not skipped."""
    base = tiny_model("llama", layers=3)
    values = base.config.to_dict() | dict(num_attention_heads=3, num_key_value_heads=1, head_dim=16, hidden_size=72)
    torch.manual_seed(0)
    model = AutoPrunedModelForCausalLM.from_config(type(base.config).from_dict(values)).eval()
    model.prune(BudgetConfig(target_params=0.5, mixes=[[0.0, 0.0, 1.0]], device="cpu"), calibration_data=windows)
    candidates = model.config.pruning_config["budget_search"]["candidates"]
    assert all(c["skipped"] is None and c["kl"] is not None for c in candidates), candidates
    assert all(c["hidden_size"] < 72 and c["hidden_size"] % 24 == 0 for c in candidates), candidates
    assert model.config.hidden_size % 3 == 0


def _expert_banks(model) -> list:
    layout = DecoderLayout(model)
    return [bank for index in range(len(layout)) for bank in layout.expert_banks(index)]


@pytest.mark.parametrize(("family", "mixes"), [("mixtral", [[0.0, 0.0, 0.0, 1.0]]), ("qwen3_moe", [[0.5, 0, 0, 0.5]]),
                                               ("gpt_oss", [[0.0, 0.0, 0.0, 0.5]]), ("llama4_text", None),
                                               ("deepseek_v3", [[0.5, 0.0, 0.0]]),
                                               ("qwen3_moe", [[0.0, 0.0, 0.5, 0.0]]),
                                               ("gpt_oss", [[0.0, 0.0, 0.25, 0.5]])])
def test_mixtures_of_experts_spend_the_budget_on_layers_experts_and_their_neurons(family, mixes, windows, tmp_path):
    model = tiny_model(family, layers=3)
    dense, experts_before = _non_embedding(model), _expert_banks(model)[0].num_experts
    config = BudgetConfig(target_params=0.6, mixes=mixes, device="cpu")
    model.prune(config, calibration_data=windows)
    entry = model.config.pruning_config["budget_search"]
    chosen = entry["candidates"][entry["chosen"]]
    kept, target = _non_embedding(model), round(0.6 * dense)
    assert entry["mixture_of_experts"] and (entry["kept_params"], entry["target_params"]) == (kept, target)
    assert abs(kept - target) <= entry["rounding_unit"], (kept, target, entry["rounding_unit"])
    if mixes is not None and len(mixes[0]) == 4 and mixes[0][3] > 0:  # the experts' share became whole experts
        assert chosen["experts_removed"] > 0, chosen
    if mixes is not None and mixes[0][2] > 0:  # the hidden share: routers and every expert lose the channels
        assert model.config.hidden_size == chosen["hidden_size"] < 64, chosen
        assert {bank.weight("down_proj", 0).shape[0] for bank in _expert_banks(model)} == {chosen["hidden_size"]}
    banks = _expert_banks(model)
    assert {bank.num_experts for bank in banks} == {experts_before - chosen["experts_removed"]}
    assert {bank.intermediate_size for bank in banks} == {chosen["mlp_neurons"]}
    assert model.config.num_hidden_layers == 3 - chosen["layers_removed"]
    if family == "mixtral":  # round_to neurons of gate, up and down in every kept expert of every kept layer
        hidden = model.config.hidden_size
        assert entry["rounding_unit"] == 8 * 3 * hidden * banks[0].num_experts * len(banks)
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert validate_record(saved["pruning_config"]) and saved_config_is_standard(saved)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| mix [depth, heads, hidden, experts] |" in card and "| chosen |" in card
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.allclose(_logits(plain), expected, atol=1e-5)
    assert {bank.num_experts for bank in _expert_banks(plain)} == {experts_before - chosen["experts_removed"]}


def test_expert_shares_the_model_cannot_take_are_skipped_with_the_reason(windows):
    dense = tiny_model("llama", layers=3)
    dense.prune(BudgetConfig(target_params=0.6, mixes=[[0, 0, 0, 0.5], [0, 0, 0]], device="cpu"),
                calibration_data=windows)
    first, second = dense.config.pruning_config["budget_search"]["candidates"]
    assert first["skipped"] == "experts: the model has no routed experts" and first["kl"] is None
    assert second["kl"] is not None
    grouped = tiny_model("deepseek_v3", layers=3)  # 4 experts in 2 router groups, 2 routed per token: none can go
    grouped.prune(BudgetConfig(target_params=0.7, device="cpu"), calibration_data=windows)
    candidates = grouped.config.pruning_config["budget_search"]["candidates"]
    with_experts = [c for c in candidates if len(c["mix"]) == 4 and c["mix"][3] > 0]
    assert with_experts and all("cannot remove 2 of the 4 routed experts" in c["skipped"] for c in with_experts)
    with_hidden = [c for c in candidates if c["mix"][2] > 0]  # multi-head latent attention: no hidden-size pruning
    assert with_hidden and all(c["skipped"].startswith("hidden: ") for c in with_hidden), with_hidden
    olmoe = tiny_model("olmoe", layers=3)  # q/k norms sized by hidden_size: hidden-size pruning refuses it
    olmoe.prune(BudgetConfig(target_params=0.7, mixes=[[0, 0, 0.5, 0], [0, 0, 0, 0]], device="cpu"),
                calibration_data=windows)
    first, second = olmoe.config.pruning_config["budget_search"]["candidates"]
    assert first["skipped"].startswith("hidden: ") and "q_norm" in first["skipped"] and first["kl"] is None
    assert second["kl"] is not None


def test_a_neuron_method_without_a_rule_for_experts_is_refused_before_any_pass(windows):
    model = tiny_model("qwen3_moe", layers=3)
    with pytest.raises(PruningConfigError, match="activation-norm-structured") as err:
        model.prune(BudgetConfig(target_params=0.6, neuron_method="llm-rank", device="cpu"), calibration_data=windows)
    assert err.value.field == "neuron_method"
    assert not getattr(model.config, "pruning_config", None)


def test_a_search_record_with_a_mix_of_five_shares_is_refused(windows):
    model = tiny_model("qwen3_moe", layers=3)
    model.prune(BudgetConfig(target_params=0.7, mixes=[[0, 0, 0, 0.5]], device="cpu"), calibration_data=windows)
    record = model.config.pruning_config
    assert validate_record(record) and len(record["budget_search"]["candidates"][0]["mix"]) == 4
    for key, value in (("mix", [0.1] * 5), ("experts_removed", -1)):
        bad = json.loads(json.dumps(record))
        bad["budget_search"]["candidates"][0][key] = value
        with pytest.raises(PruningRecordError, match=key):
            validate_record(bad)
