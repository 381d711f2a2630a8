"""The walker on every decoder-only family: dense, mixture-of-experts and hybrid.

Each family is a tiny random model built from its own config class (skipped only when the
installed transformers lacks that class). Wanda 2:4 and SparseGPT 50% must leave the exact
pattern in every pruned weight, every expert's slice included, and the saved model must
reload in plain ``AutoModelForCausalLM`` and in ``AutoPrunedModelForCausalLM`` with the same logits.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import ALL_FAMILIES, MOE_FAMILIES, VOCAB, MissingFamily, tiny_model
from transformers import AutoModelForCausalLM

from hf_prune import AutoPrunedModelForCausalLM, SparseGPTConfig, WandaConfig
from hf_prune.methods.patterns import satisfies_nm
from hf_prune.walker.layout import DecoderLayout


def _model(family: str):
    try:
        return tiny_model(family)
    except MissingFamily as err:
        pytest.skip(str(err))


def _assert_exact(model, pattern: str) -> int:
    """Every operator has exactly half of each row zero (and the N:M pattern); returns how many."""
    layout = DecoderLayout(model)
    checked = 0
    for index in range(len(layout)):
        for op in layout.operators(index):
            weight = op.read_weight()
            assert torch.all((weight == 0).sum(dim=1) == weight.shape[1] // 2), op.name
            if pattern == "2:4":
                assert satisfies_nm(weight, 2, 4), op.name
            checked += 1
    return checked


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_wanda_2_4_and_sparsegpt_50_on_every_family(family, token_ids, tmp_path):
    model = _model(family)
    report = model.prune(WandaConfig(pattern="2:4", device="cpu"), calibration_data=token_ids)
    assert report.overall >= 0.45
    checked = _assert_exact(model, "2:4")
    experts = [op for i in range(len(DecoderLayout(model))) for op in DecoderLayout(model).operators(i)
               if op.kind == "expert"]
    assert checked >= 8 and (bool(experts) == (family in MOE_FAMILIES))

    probe = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(probe).logits
    model.save_pretrained(tmp_path / "out", model_card=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ours = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(probe).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(probe).logits, expected, rtol=0, atol=1e-6)

    model = _model(family)
    report = model.prune(SparseGPTConfig(sparsity=0.5, device="cpu"), calibration_data=token_ids)
    assert report.overall >= 0.45
    _assert_exact(model, "unstructured")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_next", "llama4_text", "gpt_oss"])
def test_routers_and_scalar_gates_are_left_alone_unless_named(family, token_ids):
    model = _model(family)
    layout = DecoderLayout(model)
    routers = [op for op in layout.operators(0, include_routers=True) if op.kind == "router"]
    assert routers and not [op for op in layout.operators(0) if op.kind == "router"]
    before = {op.name: op.read_weight().clone() for op in routers}
    model.prune(WandaConfig(sparsity=0.5, device="cpu"), calibration_data=token_ids)
    for op in routers:
        assert torch.equal(op.read_weight(), before[op.name]), op.name
        assert model.pruning_report().per_module[op.name] == 0.0

    model = _model(family)
    named = f"*.{routers[0].local_name.rpartition('.')[2]}"  # "*.gate", "*.router": named explicitly
    model.prune(WandaConfig(sparsity=0.5, targets=[named, "*.mlp.*"], device="cpu"), calibration_data=token_ids)
    per_module = model.pruning_report().per_module
    assert per_module[routers[0].name] == pytest.approx(0.5)
    assert all(value == 0.0 for name, value in per_module.items() if "self_attn" in name)


@pytest.mark.parametrize("family", ["falcon_h1", "qwen3_next", "granitemoehybrid", "qwen3_5_text"])
def test_hybrid_layers_prune_projections_only(family, token_ids):
    model = _model(family)
    others = {name: p.detach().clone() for name, p in model.named_parameters() if p.dim() != 2}
    model.prune(WandaConfig(sparsity=0.5, device="cpu"), calibration_data=token_ids)
    per_module = model.pruning_report().per_module
    mixers = [name for name in per_module if ".mamba." in name or ".linear_attn." in name]
    assert mixers and all(per_module[name] == pytest.approx(0.5) for name in mixers)
    kept = {name: p for name, p in model.named_parameters() if name in others}
    changed = [name for name, p in kept.items() if not torch.equal(p, others[name]) and "experts" not in name]
    assert not changed  # conv kernels, A_log, dt_bias, D, norms and biases stay as they were
    assert any("conv1d" in name for name in others)


def test_named_projection_roles_of_new_families():
    assert DecoderLayout(_model("glm4")).spec.fused_gate_up
    spec = DecoderLayout(_model("starcoder2")).spec
    assert (spec.mlp_in, spec.mlp_out, spec.o) == (("mlp.c_fc",), "mlp.c_proj", "self_attn.o_proj")
    spec = DecoderLayout(_model("gpt_bigcode")).spec
    assert (spec.qkv, spec.o, spec.mlp_out) == ("attn.c_attn", "attn.c_proj", "mlp.c_proj")
    deepseek = DecoderLayout(_model("deepseek_v3"))
    assert deepseek.layer_spec(0).o is None and "MLA" in " ".join(deepseek.layer_spec(0).missing)
    assert deepseek.layer_spec(1).experts == ("mlp.experts",)
    with pytest.raises(ValueError, match="mixture of experts"):
        DecoderLayout(_model("mixtral")).spec  # noqa: B018
