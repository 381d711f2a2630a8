"""2:4 sparse kernels: every reason a weight stays dense (on CPU), and GPU logits when a GPU is present."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_config, tiny_model

from hf_prune import AutoPrunedModelForCausalLM, MagnitudeConfig
from hf_prune.inference.sparse_kernels import (
    FIXES,
    SparseKernelError,
    _as_linear,
    sparse_kernel_plan,
    tile_shape,
    to_sparse_kernels,
)

LLAMA_OPS = 7 * 2  # q, k, v, o, gate, up, down in two layers


def pruned(family: str = "llama", dtype: torch.dtype = torch.float16, pattern: str = "2:4", model=None, **kwargs):
    model = (model if model is not None else tiny_model(family)).to(dtype)
    model.prune(MagnitudeConfig(sparsity=0.5, pattern=pattern, **kwargs))
    return model


def test_cpu_model_is_refused_with_device_reason_and_fix():
    model = pruned()
    with pytest.raises(SparseKernelError, match="CUDA") as caught:
        to_sparse_kernels(model)
    report = caught.value.report
    assert len(report.decisions) == LLAMA_OPS and report.converted == []
    assert set(report.reasons.values()) == {"device"}
    assert FIXES["device"] in str(caught.value)
    assert isinstance(model.model.layers[0].mlp.down_proj.weight.data, torch.Tensor)  # untouched, still dense
    assert model.model.layers[0].mlp.down_proj.weight.layout == torch.strided


def test_float32_is_refused_with_dtype_reason():
    with pytest.raises(SparseKernelError, match="float16") as caught:
        to_sparse_kernels(pruned(dtype=torch.float32))
    assert set(caught.value.report.reasons.values()) == {"dtype"}
    assert sparse_kernel_plan(pruned(dtype=torch.float32)).eligible == []


def test_dense_and_unstructured_weights_are_refused_with_pattern_reason():
    for model in (tiny_model("llama").half(), pruned(pattern="unstructured")):
        with pytest.raises(SparseKernelError, match="2:4") as caught:
            to_sparse_kernels(model)
        assert set(caught.value.report.reasons.values()) == {"pattern"}


def test_plan_names_only_the_2_4_modules():
    model = pruned(targets=["mlp.*"])  # attention stays dense
    plan = sparse_kernel_plan(model)
    assert not plan.applied and plan.converted == []
    assert sorted(plan.eligible) == sorted(f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in
                                           ("gate", "up", "down"))
    assert {plan.reasons[f"model.layers.0.self_attn.{p}_proj"] for p in "qkvo"} == {"pattern"}
    assert "eligible" in plan.summary() and FIXES["pattern"] in plan.summary()


def test_shapes_the_kernel_refuses_are_reported():
    config = tiny_config("llama")
    config.intermediate_size = 136  # divisible by 4 (2:4 works) but not by the kernels' 16/32/64 tiles
    torch.manual_seed(0)
    model = pruned(model=AutoPrunedModelForCausalLM.from_config(config).eval())
    plan = sparse_kernel_plan(model)
    rows, cols = tile_shape(plan.backend, None, torch.float16)
    assert rows >= 16 and cols >= 16
    for i in range(2):
        for name in ("gate", "up", "down"):
            assert plan.reasons[f"model.layers.{i}.mlp.{name}_proj"] == "shape"
        assert plan.reasons[f"model.layers.{i}.self_attn.q_proj"] is None
    assert "(136, 64)" in plan.skipped["model.layers.0.mlp.gate_proj"]


def test_gpt2_conv1d_is_checked_in_out_in_layout_and_swaps_to_an_equal_linear():
    model = pruned("gpt2")
    plan = sparse_kernel_plan(model)
    assert len(plan.eligible) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    conv = model.transformer.h[0].mlp.c_fc
    linear = _as_linear(conv.float())
    x = torch.randn(3, 5, conv.weight.shape[0])
    assert torch.allclose(linear(x), conv(x), atol=1e-6)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        sparse_kernel_plan(pruned(), backend="triton")


def _sm80() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_logits_match_dense_within_half_precision(family, dtype):
    if not _sm80():
        pytest.skip("the 2:4 kernels need compute capability 8.0 or newer")
    torch.manual_seed(0)
    config = tiny_config(family)
    model = AutoPrunedModelForCausalLM.from_config(config).eval()
    model.prune(MagnitudeConfig(sparsity=0.5, pattern="2:4"))
    model = model.to("cuda", dtype)
    ids = torch.randint(0, VOCAB, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        dense_logits = model(ids).logits.float()
        report = to_sparse_kernels(model)
        sparse_logits = model(ids).logits.float()
    assert len(report.converted) == len(report.decisions) > 0
    assert all(isinstance(p, torch.sparse.SparseSemiStructuredTensor) for n, p in model.named_parameters()
               if n.replace(".weight", "") in report.converted)
    tolerance = 2e-2 if dtype == torch.float16 else 8e-2
    assert torch.allclose(sparse_logits, dense_logits, atol=tolerance, rtol=tolerance), (
        (sparse_logits - dense_logits).abs().max())
    assert (sparse_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean() > 0.97


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_partial_conversion_reports_the_rest():
    if not _sm80():
        pytest.skip("the 2:4 kernels need compute capability 8.0 or newer")
    model = pruned(targets=["mlp.*"]).to("cuda")
    report = to_sparse_kernels(model)
    assert len(report.converted) == 6
    assert {report.reasons[f"model.layers.0.self_attn.{p}_proj"] for p in "qkvo"} == {"pattern"}
    again = to_sparse_kernels(model)  # idempotent: already converted weights are reported, not an error
    assert again.converted == [] and "converted" in set(again.reasons.values())
