"""The contract every registered method keeps: prune, exact pattern, save, plain reload, record round-trip.

Runs over ``hf_prune.methods.registry.METHODS``, so a newly registered method is covered
without touching this file. Weight-pruning methods are checked with 50% unstructured and 2:4;
structured methods (which remove neurons, heads, layers or experts: their config has ``amount``) with a 50%
cut, which every layer takes alike, so the saved config states the smaller sizes and plain transformers
loads every checkpoint. Methods for mixture-of-experts models only (``needs_experts``) run on a tiny Mixtral.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from hf_prune import AutoPrunedModelForCausalLM, PruningConfig
from hf_prune.methods.base import LayerPruner
from hf_prune.methods.patterns import satisfies_nm
from hf_prune.methods.registry import METHODS, config_class, pruner_class
from hf_prune.report import count_parameters
from hf_prune.walker.layout import decoder_operators

STRUCTURED = sorted(name for name in METHODS if "amount" in config_class(name).__dataclass_fields__)
WEIGHT_METHODS = sorted(set(METHODS) - set(STRUCTURED))
CASES = [(name, pattern) for name in WEIGHT_METHODS for pattern in ("unstructured", "2:4")]
CASES += [(name, "structured") for name in STRUCTURED]


def _config(name: str, pattern: str) -> PruningConfig:
    cls = config_class(name)
    if pattern == "structured":
        return cls(amount=0.5, device="cpu")
    return cls(sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern, device="cpu")


def test_registry_names_match_classes():
    for name in METHODS:
        config_cls, pruner_cls = config_class(name), pruner_class(name)
        assert config_cls.method == name
        assert issubclass(config_cls, PruningConfig) and issubclass(pruner_cls, LayerPruner)
        assert pruner_cls.__doc__ and config_cls.__doc__, f"{name}: config and pruner need class docstrings"
        assert isinstance(config_cls(device="cpu").make_pruner(), pruner_cls)


@pytest.mark.parametrize(("name", "pattern"), CASES)
def test_method_contract(name, pattern, token_ids, tmp_path):
    model = tiny_model("mixtral" if getattr(config_class(name), "needs_experts", False) else "llama")
    config = _config(name, pattern)
    dense_parameters = count_parameters(model)
    model.prune(config, calibration_data=token_ids)

    if pattern == "structured":
        assert count_parameters(model) < dense_parameters
    else:
        for op in decoder_operators(model):
            weight = op.read_weight()
            assert torch.all((weight == 0).sum(dim=1) == weight.shape[1] // 2), op.name
            if pattern == "2:4":
                assert satisfies_nm(weight, 2, 4), op.name

    probe = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(probe).logits
    model.save_pretrained(tmp_path / "out")
    record = json.loads((tmp_path / "out" / "config.json").read_text())["pruning_config"]
    assert record["method"] == name
    assert PruningConfig.from_dict(record).to_dict() == config.to_dict()

    reloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(probe).logits, expected, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # zeros in the weights, or a standard config
    with torch.no_grad():
        assert torch.allclose(plain(probe).logits, expected, atol=1e-5)
