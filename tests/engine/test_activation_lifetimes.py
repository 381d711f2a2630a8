"""The sequential pass keeps no activation alive longer than the layer that needs it."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from tiny_models import tiny_model

import hf_prune.engine.loop as engine
from hf_prune import SparseGPTConfig, WandaConfig
from hf_prune.engine.layer_pass import StatisticsCollector
from hf_prune.engine.statistics import StatKind
from hf_prune.methods.base import LayerPruner
from hf_prune.walker.layout import DecoderLayout


def test_collector_shares_statistics_without_keeping_the_input_alive():
    layout = DecoderLayout(tiny_model("llama"))
    q, k = (op for op in layout.all_targeted(None)[0] if op.local_name in ("self_attn.q_proj", "self_attn.k_proj"))
    collector = StatisticsCollector([q, k], lambda op: StatKind.GRAM, torch.device("cpu"))
    x = torch.randn(3, 5, q.in_features)
    collector.observe(q, x)
    collector.observe(k, x)  # the same tensor: one Gram matrix for both
    assert collector.stats[q.name] is collector.stats[k.name]
    assert collector.stats[q.name].tokens == 15
    seen = weakref.ref(x)
    del x
    gc.collect()
    assert seen() is None  # the collector remembered it by weak reference only
    collector.observe(k, torch.randn(3, 5, q.in_features))  # a new tensor is new data, not the old one
    assert collector.stats[k.name].tokens == 30
    collector.remove()


@pytest.mark.parametrize("config", [WandaConfig(device="cpu"), SparseGPTConfig(pattern="2:4", device="cpu")],
                         ids=["wanda", "sparsegpt"])
def test_layer_zero_inputs_are_freed_once_layer_zero_is_done(config, token_ids, monkeypatch):
    captured: list[weakref.ref] = []
    alive_at_layer: dict[int, bool] = {}
    capture = engine.capture_layer_inputs
    start_layer = LayerPruner.start_layer

    def recording_capture(*args, **kwargs):
        hidden, calls = capture(*args, **kwargs)
        captured.append(weakref.ref(hidden))
        return hidden, calls

    def recording_start(self, context):
        gc.collect()
        alive_at_layer[context.index] = captured[0]() is not None
        return start_layer(self, context)

    monkeypatch.setattr(engine, "capture_layer_inputs", recording_capture)
    monkeypatch.setattr(LayerPruner, "start_layer", recording_start)
    model = tiny_model("llama")
    model.prune(config, calibration_data=token_ids)
    assert alive_at_layer == {0: True, 1: False}
