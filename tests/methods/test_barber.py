"""LLM-Barber: config, mask rebuilding rules, and rebuilding inside the engine on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from hf_prune import (
    AutoPrunedModelForCausalLM,
    BarberConfig,
    MagnitudeConfig,
    PruningConfig,
    SparseGPTConfig,
    WandaConfig,
)
from hf_prune.methods.barber.method import BarberPruner, rebuild_masks
from hf_prune.methods.patterns import parse_pattern, satisfies_nm
from hf_prune.walker.layout import DecoderLayout

# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "config",
    [
        BarberConfig(),
        BarberConfig(initial=SparseGPTConfig(block_size=64), pattern="2:4", threshold=0.2,
                     keep_initial_updates=False, grad_batch_size=2, num_samples=4, seq_len=16),
        BarberConfig(initial="magnitude", rebuild="gradient", granularity="block", targets=["mlp.*"], owl=True),
        BarberConfig(initial={"method": "wanda"}, rebuild="gradient", granularity="layer", sparsity=0.6),
        BarberConfig(initial="sparsegpt", rebuild="gradient", pattern="4:8"),
    ],
)
def test_json_round_trip(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == "barber" and isinstance(data["initial"], dict)
    again = PruningConfig.from_dict(data)
    assert type(again) is BarberConfig and again == config
    assert type(again.initial) is type(config.initial) and again.initial == config.initial
    assert PruningConfig.from_json_string(config.to_json_string()) == config


def test_initial_method_defaults_and_shared_fields():
    assert isinstance(BarberConfig().initial, WandaConfig)
    assert BarberConfig().rebuild == "swaps" and BarberConfig().threshold == 0.1
    assert BarberConfig(rebuild="gradient").threshold == 0.01
    assert BarberConfig(initial="sparsegpt", rebuild="gradient").threshold == 0.1
    assert BarberConfig(initial=MagnitudeConfig(), rebuild="gradient").threshold == 0.1
    assert BarberConfig(threshold=0.0).threshold == 0.0
    config = BarberConfig(initial=SparseGPTConfig(block_size=32), pattern="2:4", targets=["mlp.*"], owl=None,
                          num_samples=4)
    assert config.initial.block_size == 32
    assert (config.initial.pattern, config.initial.sparsity, config.initial.targets, config.initial.num_samples) == (
        "2:4", 0.5, ["mlp.*"], 4
    )
    assert BarberConfig(owl=True).initial.owl is None  # OWL is the engine's business, from the outer config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "2:4", "granularity": "layer", "rebuild": "gradient"}, "granularity='row'"),
        ({"pattern": "4:8", "granularity": "block", "rebuild": "gradient"}, "granularity='row'"),
        ({"granularity": "layer"}, "applies to rebuild='gradient'"),
        ({"rebuild": "taylor"}, "rebuild must be one of"),
        ({"granularity": "column"}, "granularity must be one of"),
        ({"threshold": 1.5}, r"threshold must be a share in \[0, 1\]"),
        ({"threshold": -0.1}, "threshold must be"),
        ({"initial": "fista"}, "not a starting method"),
        ({"initial": {"method": "barber"}}, "initial must be one of"),
        ({"initial": WandaConfig(sparsity=0.7)}, "set sparsity on BarberConfig only"),
        ({"initial": WandaConfig(pattern="2:4")}, "set pattern on BarberConfig only"),
        ({"keep_initial_updates": "yes"}, "keep_initial_updates must be"),
        ({"grad_batch_size": 0}, "grad_batch_size must be a positive integer"),
    ],
)
def test_bad_settings_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BarberConfig(**kwargs)


# ---------------------------------------------------------------- mask rebuilding rules


def _random_case(rows: int, cols: int, pattern_text: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    pattern = parse_pattern(pattern_text)
    from hf_prune.methods.patterns import mask_from_scores

    mask = mask_from_scores(torch.rand(rows, cols, generator=gen), pattern, 0.5)
    return torch.rand(rows, cols, generator=gen), mask, pattern


@pytest.mark.parametrize("pattern_text", ["unstructured", "2:4", "4:8"])
def test_row_rebuild_keeps_every_row_and_group(pattern_text):
    scores, mask, pattern = _random_case(12, 64, pattern_text, seed=0)
    (new,) = rebuild_masks([scores], [mask], "row", pattern, threshold=0.5)
    assert (new != mask).any()
    assert torch.equal(new.sum(dim=1), mask.sum(dim=1))
    if pattern.is_nm:
        assert torch.equal(new.reshape(12, -1, pattern.m).sum(-1), mask.reshape(12, -1, pattern.m).sum(-1))
        assert satisfies_nm((~new).float(), pattern.n, pattern.m)
    # every swap grows a pruned entry that outscores the kept entry dropped in its row
    for row in range(12):
        grown, dropped = scores[row][mask[row] & ~new[row]], scores[row][~mask[row] & new[row]]
        if grown.numel():
            assert grown.min() > dropped.max() or pattern.is_nm


def test_full_threshold_selects_the_top_scores_of_each_row():
    scores, mask, pattern = _random_case(6, 40, "unstructured", seed=1)
    (new,) = rebuild_masks([scores], [mask], "row", pattern, threshold=1.0)
    kept = (~mask).sum(dim=1)[0]
    top = torch.topk(scores, int(kept), dim=1).indices
    expected = torch.ones_like(mask).scatter_(1, top, False)
    assert torch.equal(new, expected)


def test_threshold_zero_swaps_nothing():
    scores, mask, pattern = _random_case(8, 32, "unstructured", seed=2)
    for granularity in ("row", "layer", "block"):
        (new,) = rebuild_masks([scores], [mask], granularity, pattern, threshold=0.0)
        assert torch.equal(new, mask)


def test_layer_and_block_keep_their_totals():
    first, mask1, pattern = _random_case(8, 32, "unstructured", seed=3)
    second, mask2, _ = _random_case(16, 32, "unstructured", seed=4)
    second = second * 3  # the second weight scores higher: block granularity moves density towards it
    new1, new2 = rebuild_masks([first, second], [mask1, mask2], "layer", pattern, 0.5)
    assert int(new1.sum()) == int(mask1.sum()) and int(new2.sum()) == int(mask2.sum())
    assert not torch.equal(new1.sum(dim=1), mask1.sum(dim=1))  # rows may change at layer granularity
    block1, block2 = rebuild_masks([first, second], [mask1, mask2], "block", pattern, 0.5)
    assert int(block1.sum() + block2.sum()) == int(mask1.sum() + mask2.sum())
    assert int(block2.sum()) < int(mask2.sum())


# ---------------------------------------------------------------- inside the engine


class _Spy(BarberPruner):
    """Records each operator's weights from the starting method and after rebuilding, and checks the
    dense copy's scope."""

    def __init__(self, config):
        super().__init__(config, measure_after=True)
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def start_layer(self, context):
        super().start_layer(context)
        assert set(self._dense) == {op.name for op in context.targets}  # the current layer only

    def finish_layer(self, context):
        if self._swaps:  # already rebuilt; the starting method's weights were kept aside
            before = {op.name: self._started[op.name].clone() for op in context.targets}
        else:
            before = {op.name: op.read_weight().clone() for op in context.targets}
        changed = super().finish_layer(context)
        self.before.update(before)
        self.after.update({op.name: op.read_weight().clone() for op in context.targets})
        return changed


@pytest.fixture
def spy(monkeypatch):
    made: list[_Spy] = []

    def make(self):
        made.append(_Spy(self))
        return made[-1]

    monkeypatch.setattr(BarberConfig, "make_pruner", make)
    return made


@pytest.mark.parametrize("rebuild", ["swaps", "gradient"])
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("pattern_text", ["unstructured", "2:4"])
def test_rebuilding_keeps_row_sparsity_and_pattern_and_lowers_block_error(family, pattern_text, rebuild, token_ids,
                                                                          spy):
    model = tiny_model(family)
    model.prune(BarberConfig(pattern=pattern_text, threshold=0.3, rebuild=rebuild, device="cpu"),
                calibration_data=token_ids)
    pruner = spy[-1]
    assert len(pruner.rebuilds) == 2 * len(DecoderLayout(model))
    assert set(pruner.before) == {op.name for ops in DecoderLayout(model).all_targeted(None) for op in ops}
    pattern = parse_pattern(pattern_text)
    swapped = 0
    for name, before in pruner.before.items():
        after = pruner.after[name]
        assert torch.equal((before == 0).sum(dim=1), (after == 0).sum(dim=1)), name
        if pattern.is_nm:
            assert satisfies_nm(before, 2, 4) and satisfies_nm(after, 2, 4), name
        swapped += int(((before == 0) & (after != 0)).sum())
    assert swapped == sum(r.swapped for r in pruner.rebuilds) > 0
    for record in pruner.rebuilds:
        assert record.swapped > 0, record
        assert record.mse_after < record.mse_before, record
    # the layer's weights in the model are the rebuilt ones, and the report agrees with the target
    assert model.pruning_report().overall == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("rebuild", ["swaps", "gradient"])
def test_threshold_zero_gives_the_starting_mask_exactly(rebuild, token_ids):
    reference = tiny_model("llama")
    reference.prune(WandaConfig(device="cpu"), calibration_data=token_ids)
    model = tiny_model("llama")
    model.prune(BarberConfig(threshold=0.0, rebuild=rebuild, device="cpu"), calibration_data=token_ids)
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def test_dense_weights_without_sparsegpt_updates(token_ids):
    dense = tiny_model("llama")
    model = tiny_model("llama")
    model.prune(BarberConfig(initial="sparsegpt", rebuild="gradient", threshold=0.2, keep_initial_updates=False,
                             device="cpu"), calibration_data=token_ids)
    layout, dense_layout = DecoderLayout(model), DecoderLayout(dense)
    for index in range(len(layout)):
        for op, dense_op in zip(layout.operators(index), dense_layout.operators(index)):
            weight, original = op.read_weight(), dense_op.read_weight()
            kept = weight != 0
            assert torch.equal(weight[kept], original[kept]), op.name  # every kept weight has its dense value
            assert torch.equal((~kept).sum(dim=1), torch.full((weight.shape[0],), weight.shape[1] // 2)), op.name


def test_swaps_touch_only_the_grown_and_dropped_weights(token_ids, spy):
    """Weights kept by the starting method and by the rebuild keep the starting value (SparseGPT's update),
    except the few dropped by one swap and grown back by a later one."""
    model = tiny_model("llama")
    model.prune(BarberConfig(initial="sparsegpt", threshold=0.3, device="cpu"), calibration_data=token_ids)
    grown = changed = kept = 0
    for name, before in spy[-1].before.items():
        after = spy[-1].after[name].float()
        both = (before != 0) & (after != 0)
        kept += int(both.sum())
        changed += int((after[both] != before[both]).sum())
        grown += int(((before == 0) & (after != 0)).sum())
    assert grown == sum(r.swapped for r in spy[-1].rebuilds) > 0
    assert changed <= 0.1 * grown, (changed, grown, kept)


@pytest.mark.parametrize("rebuild", ["swaps", "gradient"])
def test_bfloat16_model_rebuilds_in_float32(rebuild, token_ids, spy):
    model = tiny_model("qwen3").to(torch.bfloat16)
    model.prune(BarberConfig(pattern="2:4", threshold=0.3, rebuild=rebuild, device="cpu"), calibration_data=token_ids)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert sum(r.swapped for r in spy[-1].rebuilds) > 0
    for name, after in spy[-1].after.items():
        assert after.dtype == torch.bfloat16 and satisfies_nm(after, 2, 4), name
        assert torch.equal((after == 0).sum(dim=1), (spy[-1].before[name] == 0).sum(dim=1)), name


def test_batched_statistics_and_gradients(token_ids, spy):
    model = tiny_model("gpt_neox")
    model.prune(BarberConfig(threshold=0.3, batch_size=3, grad_batch_size=3, rebuild="gradient", granularity="block",
                             device="cpu"), calibration_data=token_ids)
    assert all(r.mse_after < r.mse_before for r in spy[-1].rebuilds)
    assert model.pruning_report().overall == pytest.approx(0.5, abs=1e-6)


def test_save_and_reload_records_the_nested_config(tmp_path, token_ids):
    model = tiny_model("llama")
    config = BarberConfig(initial=SparseGPTConfig(block_size=16), pattern="2:4", threshold=0.2, device="cpu")
    model.prune(config, calibration_data=token_ids)
    model.save_pretrained(tmp_path / "barber")
    again = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "barber")
    record = again.config.pruning_config
    assert record["method"] == "barber" and record["initial"]["block_size"] == 16
    assert PruningConfig.from_dict(record) == config
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rebuild", ["swaps", "gradient"])
def test_rebuilds_on_the_gpu(rebuild, token_ids, spy):
    model = tiny_model("llama").to(torch.float16)
    model.prune(BarberConfig(threshold=0.3, rebuild=rebuild, device="cuda"), calibration_data=token_ids)
    assert next(model.parameters()).device.type == "cpu"
    assert sum(r.swapped for r in spy[-1].rebuilds) > 0
