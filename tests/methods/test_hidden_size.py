"""Hidden-size pruning (Minitron's embedding channels): shapes, standard checkpoints, channel choice, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB, save_tiny, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from hf_prune import AutoPrunedModelForCausalLM, HiddenSizeConfig, PruningConfig
from hf_prune.card.render import write_card
from hf_prune.checkpoint.record import validate_record
from hf_prune.checkpoint.standard_config import saved_config_is_standard
from hf_prune.cli import main
from hf_prune.errors import PruningConfigError, PruningRecordError, UnsupportedArchitectureError
from hf_prune.surgery.hidden import _shrink_heads, final_norms, hidden_size_multiple, layer_norms
from hf_prune.walker.layout import DecoderLayout

PROBE = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
#: family -> (config.json key of the hidden size, head_dim after pruning 64 -> 32)
FAMILIES = {"llama": ("hidden_size", 16), "qwen3": ("hidden_size", 16), "gemma3": ("hidden_size", 16),
            "gpt2": ("n_embd", 8), "phi3": ("hidden_size", 16), "opt": ("hidden_size", 8)}
#: families whose head width is hidden_size / heads: heads shrink with the hidden size, no head_dim field
COUPLED = ("gpt2", "opt")


def _logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_reload_gives_the_same_logits(family, token_ids, tmp_path):
    model = tiny_model(family)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.prune(HiddenSizeConfig(amount=0.5, device="cpu"), calibration_data=token_ids)
    key, head_dim = FAMILIES[family]
    record = model.config.pruning_config["removed_channels"]
    assert (record["hidden_before"], record["hidden_after"], record["config_field"]) == (64, 32, key)
    assert record["head_dim_after"] == head_dim and len(record["removed"]) == 32 and len(record["scores"]) == 64
    assert record["parameters_after"] < record["parameters_before"]
    assert model.get_input_embeddings().weight.shape[1] == 32
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    for module in model.modules():  # nothing is left 64 wide on the residual stream
        if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            assert module.weight.shape[0] in (32, 16, 8), type(module).__name__
    expected = _logits(model)
    generated = model.generate(PROBE[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)

    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved[key] == 32 and saved_config_is_standard(saved)
    if family not in COUPLED:
        assert saved["head_dim"] == head_dim
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.allclose(_logits(plain), expected, atol=1e-5)
    assert torch.equal(plain.generate(PROBE[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False), generated)
    ours = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.allclose(_logits(ours), expected, atol=1e-5)
    report = ours.pruning_report()
    assert "hidden size 32/64" in report.summary() and "sparsity" not in report.summary()
    assert str(report).splitlines()[0].startswith("hidden-size pruning: hidden size 32/64")  # no empty layer table
    card = (tmp_path / "out" / "README.md").read_text()
    assert "hidden size 32 of 64" in card and "| 64 | 32 |" in card
    if family == "llama":  # tests/inference/test_vllm_serving.py and test_llama_cpp_convert.py run these
        assert "vLLM | yes (tested: it serves tiny Llama checkpoints with residual-stream channels removed" in card
    else:
        assert "vLLM | yes (expected: it reads the kept sizes from config.json; tested only on" in card


def test_untied_gemma_embedding_keeps_its_outputs(token_ids):
    """Gemma scales embeddings by sqrt(hidden_size), which the new config lowers: an untied embedding absorbs it."""
    model = tiny_model("gemma3")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    embed = model.get_input_embeddings()
    dense = embed(PROBE).detach()
    model.prune(HiddenSizeConfig(hidden_size=32, device="cpu"), calibration_data=token_ids)
    kept = [c for c in range(64) if c not in model.config.pruning_config["removed_channels"]["removed"]]
    assert float(embed.embed_scale) == pytest.approx(32 ** 0.5)
    assert torch.allclose(embed(PROBE), dense[..., kept], atol=1e-5)


def test_dead_channels_are_removed_first(token_ids):
    """Channels that nothing writes into are zero after every norm: they score 0 and go first."""
    model = tiny_model("llama")
    dead = [3, 17, 40, 63]
    layout = DecoderLayout(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, dead] = 0
        for index in range(len(layout)):
            for name in (layout.spec.o, layout.spec.mlp_out):
                layout.submodule(index, name).weight[dead] = 0
    dense = _logits(model)
    model.prune(HiddenSizeConfig(hidden_size=60, device="cpu"), calibration_data=token_ids)
    record = model.config.pruning_config["removed_channels"]
    assert record["removed"] == dead
    assert all(record["scores"][c] == 0 for c in dead) and min(
        s for c, s in enumerate(record["scores"]) if c not in dead) > 0
    # every norm now divides by the RMS of 60 channels instead of 64 (the other 4 were zero): renormalize
    # scales each by sqrt(64 / 60), which gives back the dense model exactly
    assert record["norm_scales"] == [pytest.approx((64 / 60) ** 0.5, abs=1e-6)] * 5
    assert torch.allclose(_logits(model), dense, atol=1e-4)


def test_without_renormalize_the_norms_are_only_sliced(token_ids):
    model = tiny_model("llama")
    weight = model.model.norm.weight.detach().clone()
    model.prune(HiddenSizeConfig(hidden_size=48, renormalize=False, device="cpu"), calibration_data=token_ids)
    record = model.config.pruning_config["removed_channels"]
    kept = [c for c in range(64) if c not in record["removed"]]
    assert record["norm_scales"] == [] and torch.equal(model.model.norm.weight, weight[kept])


def test_gemma_norms_are_scaled_through_their_offset_weight():
    from hf_prune.methods.hidden_size import scale_norm

    model = tiny_model("gemma3")
    norm = model.model.norm
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 64)
    before = norm(x)
    scale_norm(norm, 1.5)
    assert torch.allclose(norm(x), 1.5 * before, atol=1e-5)
    layer_norm = tiny_model("gpt2").transformer.ln_f
    with torch.no_grad():
        layer_norm.bias.normal_()
    before = layer_norm(x)
    scale_norm(layer_norm, 0.5)
    assert torch.allclose(layer_norm(x), 0.5 * (before - layer_norm.bias) + layer_norm.bias, atol=1e-5)


def test_every_residual_norm_is_scored():
    gemma = DecoderLayout(tiny_model("gemma3"))
    names = {type(n).__name__ for n in layer_norms(gemma, 0)}
    assert len(layer_norms(gemma, 0)) == 4 and names == {"Gemma3RMSNorm"}  # not q_norm / k_norm
    assert len(final_norms(gemma)) == 1
    gpt2 = DecoderLayout(tiny_model("gpt2"))
    assert len(layer_norms(gpt2, 0)) == 2 and len(final_norms(gpt2)) == 1


def test_gpt2_head_channels_keep_the_attention_scores():
    """Shrinking GPT-2's head width drops query/key and value/output channels and rescales the queries:
    with the dropped channels' weights zero, the logits do not change."""
    model = tiny_model("gpt2")
    layout = DecoderLayout(model)
    keep = 12
    for index in range(len(layout)):
        attn = layout.layers[index].attn
        with torch.no_grad():
            for head in range(4):
                for block in range(3):  # c_attn is [q; k; v], each 4 heads of 16 channels
                    attn.c_attn.weight[:, block * 64 + head * 16 + keep:block * 64 + head * 16 + 16] = 0
                    attn.c_attn.bias[block * 64 + head * 16 + keep:block * 64 + head * 16 + 16] = 0
                attn.c_proj.weight[head * 16 + keep:head * 16 + 16] = 0
    expected = _logits(model)

    def first(layout, index, kept):
        rows = torch.arange(kept).expand(4, kept)
        return rows, rows

    for index in range(len(layout)):
        assert _shrink_heads(layout, index, keep, first) == (16, keep)
    assert layout.layers[0].attn.c_attn.weight.shape == (64, 3 * 4 * keep)
    assert torch.allclose(_logits(model), expected, atol=1e-5)


def _residual_widths(model) -> dict[str, set[int]]:
    """The residual-stream side of every router and routed-expert parameter: {name: widths seen}."""
    layout = DecoderLayout(model)
    widths: dict[str, set[int]] = {"router": set(), "gate_up": set(), "down": set(), "down_bias": set()}
    for index in range(len(layout)):
        for bank in layout.expert_banks(index):
            for projection in bank.projections:
                out_in = bank.weight(projection.parameter, 0)
                widths["down" if projection.role == "down" else "gate_up"].add(
                    out_in.shape[0] if projection.role == "down" else out_in.shape[1])
                if projection.role == "down" and projection.bias is not None:
                    widths["down_bias"].add(bank.stored(projection.bias).shape[1])
            block = layout.submodule(index, bank.path.rpartition(".")[0])
            router = next(m for name, m in block.named_children() if name in ("gate", "router"))
            widths["router"].add(router.weight.shape[1])
    return widths


def _qwen3_moe_with_a_dense_layer():
    config = type(tiny_config("qwen3_moe")).from_dict(tiny_config("qwen3_moe").to_dict() | {"mlp_only_layers": [0]})
    torch.manual_seed(0)
    return AutoPrunedModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "llama4_text", "qwen3_moe+dense"])
def test_mixtures_of_experts_lose_the_channels_in_router_experts_and_shared_experts(family, token_ids, tmp_path):
    model = _qwen3_moe_with_a_dense_layer() if family == "qwen3_moe+dense" else tiny_model(family)
    assert {w for widths in _residual_widths(model).values() for w in widths} <= {64}
    model.prune(HiddenSizeConfig(amount=0.5, device="cpu"), calibration_data=token_ids)
    record = model.config.pruning_config["removed_channels"]
    assert (record["hidden_before"], record["hidden_after"]) == (64, 32)
    assert record["parameters_after"] < record["parameters_before"]
    widths = _residual_widths(model)
    assert widths["router"] == widths["gate_up"] == widths["down"] == {32}
    assert widths["down_bias"] == ({32} if family == "gpt_oss" else set())
    if family == "llama4_text":  # the shared expert beside the routed ones reads and writes 32 channels too
        shared = model.model.layers[0].feed_forward.shared_expert
        assert shared.gate_proj.in_features == shared.down_proj.out_features == 32
    if family == "qwen3_moe+dense":
        assert model.model.layers[0].mlp.down_proj.out_features == 32
    expected = _logits(model)
    generated = model.generate(PROBE[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["hidden_size"] == 32 and saved["head_dim"] == 16 and saved_config_is_standard(saved)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(plain).__module__.startswith("transformers.")
    torch.testing.assert_close(_logits(plain), expected, atol=1e-5, rtol=0)
    assert torch.equal(plain.generate(PROBE[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False), generated)


@pytest.mark.parametrize(("family", "reason"), [
    ("olmoe", "q_norm"),  # its q/k norms are hidden_size wide but normalise the heads' width, which stays
    ("deepseek_v3", "layer 0: .*MLA"),  # multi-head latent attention
    ("qwen3_next", "layer 0: .*linear_attn"),  # linear-attention layers
    ("granitemoehybrid", "layer 0: .*found none"),  # Mamba layers
])
def test_mixtures_of_experts_it_cannot_shrink_are_refused_before_any_work(family, reason, token_ids):
    model = tiny_model(family)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(UnsupportedArchitectureError, match=f"hidden-size pruning.*{reason}"):
        model.prune(HiddenSizeConfig(amount=0.5, device="cpu"), calibration_data=token_ids)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())


def test_bad_sizes_are_refused(token_ids):
    with pytest.raises(PruningConfigError, match="exceeds"):
        tiny_model("llama").prune(HiddenSizeConfig(hidden_size=80, device="cpu"), calibration_data=token_ids)
    with pytest.raises(PruningConfigError, match="multiple of 4"):
        tiny_model("gpt2").prune(HiddenSizeConfig(hidden_size=30, device="cpu"), calibration_data=token_ids)


def test_config_validation_and_round_trip():
    assert HiddenSizeConfig().amount == 0.25 and HiddenSizeConfig().sparsity == 0.25
    assert HiddenSizeConfig(amount=0.25).channels_to_keep(576) == 432
    assert HiddenSizeConfig(amount=0.3).channels_to_keep(576) == 400  # 403.2 rounded to a multiple of 8
    assert HiddenSizeConfig(amount=0.3, round_to=1).channels_to_keep(576) == 403
    assert HiddenSizeConfig(amount=0.5).channels_to_keep(64, multiple=12) == 24  # lcm(8, 12)
    assert HiddenSizeConfig(hidden_size=500).channels_to_keep(576) == 500
    for config in (HiddenSizeConfig(amount=0.3, round_to=64), HiddenSizeConfig(hidden_size=512)):
        assert PruningConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="not both"):
        HiddenSizeConfig(amount=0.3, hidden_size=512)
    with pytest.raises(ValueError, match="amount must be in"):
        HiddenSizeConfig(amount=1.0)
    with pytest.raises(ValueError, match="round_to"):
        HiddenSizeConfig(round_to=0)
    with pytest.raises(ValueError, match="pattern"):
        HiddenSizeConfig(pattern="2:4")
    with pytest.raises(ValueError, match="targets"):
        HiddenSizeConfig(targets=["*mlp*"])
    with pytest.raises(ValueError, match="keep 0"):
        HiddenSizeConfig(amount=0.95).channels_to_keep(64)


def test_record_is_validated(token_ids):
    model = tiny_model("llama")
    model.prune(HiddenSizeConfig(amount=0.5, device="cpu"), calibration_data=token_ids)
    record = json.loads(json.dumps(model.config.pruning_config))
    validate_record(record)
    for key, value in (("hidden_after", 80), ("removed", [1, 1]), ("removed", list(range(40, 72))),
                       ("scores", ["x"]), ("hidden_before", -1), ("config_field", 3), ("norm_scales", [-1.0]),
                       ("norm_scales", "x")):
        bad = json.loads(json.dumps(record))
        bad["removed_channels"][key] = value
        with pytest.raises(PruningRecordError, match="removed_channels"):
            validate_record(bad)


def test_cli_prunes_the_hidden_size(tmp_path, capsys):
    source = save_tiny(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("calibration text for the command line. " * 80)
    out = tmp_path / "out"
    assert main(["prune", "--model", str(source), "--method", "hidden-size", "--param", "amount=0.25",
                 "--calibration", str(text), "--num-samples", "4", "--seq-len", "32", "--device", "cpu",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hidden size: 48 of 64 (hidden_size in config.json)" in printed
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 48
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 48
    write_card(out)  # renders again from the saved record
    assert tiny_config("qwen3").hidden_size == 64


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2", "smollm3", "olmo2", "granite", "glm4", "cohere2",
                                    "starcoder2", "phi"])
def test_other_dense_families_reload_the_same(family, token_ids, tmp_path):
    model = tiny_model(family)
    model.prune(HiddenSizeConfig(amount=0.5, device="cpu"), calibration_data=token_ids)
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out", model_card=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert plain.config.hidden_size == 32
    assert torch.allclose(_logits(plain), expected, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt_neox", "gpt_bigcode", "falcon"])
def test_families_it_cannot_shrink_are_refused_before_any_work(family, token_ids):
    model = tiny_model(family)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(UnsupportedArchitectureError, match="hidden-size pruning"):
        model.prune(HiddenSizeConfig(amount=0.5, device="cpu"), calibration_data=token_ids)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())


def test_hidden_size_then_neurons_and_layers_stay_standard(token_ids, tmp_path):
    from hf_prune import DepthConfig, L1NormStructuredConfig

    model = tiny_model("qwen3", layers=3)
    model.prune(HiddenSizeConfig(amount=0.25, device="cpu"), calibration_data=token_ids)
    model.prune(L1NormStructuredConfig(amount=0.5, heads=True, device="cpu"))
    model.prune(DepthConfig(num_layers=1, device="cpu"), calibration_data=token_ids)
    expected = _logits(model)
    assert "hidden size 48/64" in model.pruning_report().summary()
    model.save_pretrained(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    config = plain.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.head_dim) == (48, 64, 2, 16)
    assert torch.allclose(_logits(plain), expected, atol=1e-5)
    ours = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.allclose(_logits(ours), expected, atol=1e-5)


def test_kept_size_is_a_multiple_of_the_heads_where_the_config_requires_it(token_ids, tmp_path):
    """transformers 5's LlamaConfig refuses a hidden size its heads do not divide, even with an explicit head_dim
    (SmolLM2 has 9 heads): the kept size is rounded to lcm(round_to, heads), here 24, and reloads plainly."""
    values = tiny_config("llama").to_dict() | dict(num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                                                 hidden_size=72)
    config = type(tiny_config("llama")).from_dict(values)
    torch.manual_seed(0)
    model = AutoPrunedModelForCausalLM.from_config(config).eval()
    layout = DecoderLayout(model)
    assert hidden_size_multiple(layout) == 3
    model.prune(HiddenSizeConfig(amount=0.4, device="cpu"), calibration_data=token_ids)  # 43.2 kept -> 48, not 40
    assert model.config.hidden_size == 48
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(plain), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(PruningConfigError, match="multiple of 3"):
        AutoPrunedModelForCausalLM.from_config(config).prune(HiddenSizeConfig(hidden_size=40, device="cpu"),
                                                             calibration_data=token_ids)
    assert hidden_size_multiple(DecoderLayout(tiny_model("llama"))) == 4  # 4 heads, hidden 64
    assert hidden_size_multiple(DecoderLayout(tiny_model("gpt2"))) == 4  # coupled: head width is hidden / heads
