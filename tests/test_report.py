"""pruning_report() says what a run removed: zeros, or neurons, heads and parameters, or both."""

from __future__ import annotations

from tiny_models import tiny_model

from hf_prune import L1NormStructuredConfig, WandaConfig
from hf_prune.report import count_parameters, zeroing_runs


def test_structured_report_names_what_was_removed_not_a_zero_sparsity(token_ids):
    model = tiny_model("llama")
    before = count_parameters(model)
    returned = model.prune(L1NormStructuredConfig(amount=0.5, heads=True, device="cpu"))
    report = model.pruning_report()
    for r in (returned, report):
        assert r.structure is not None and not r.zeroed
        assert r.structure.totals("mlp_neurons") == (128, 256)
        assert r.structure.totals("attention_heads") == (4, 8) and r.structure.totals("kv_heads") == (2, 4)
        assert r.structure.parameters_before == before
        assert r.structure.parameters_after == count_parameters(model) < before
    text = str(report)
    assert "sparsity" not in text  # no near-zero figure that reads as a no-op
    assert "64/128" in text and "2/4" in text  # per layer: kept / dense neurons and heads
    assert f"parameters {before:,} -> {count_parameters(model):,}" in text
    assert report.summary().startswith("removed 50.0% of MLP neurons (128 of 256), 4 of 8 attention heads")


def test_mixed_report_shows_both(token_ids):
    model = tiny_model("llama")
    model.prune(L1NormStructuredConfig(amount=0.5, device="cpu"))
    model.prune(WandaConfig(pattern="2:4", sparsity=None, device="cpu"), calibration_data=token_ids)
    report = model.pruning_report()
    assert report.structure is not None and report.zeroed
    assert report.overall == 0.5
    summary = report.summary()
    assert "removed 50.0% of MLP neurons (128 of 256)" in summary
    assert "sparsity 0.5000 of the remaining decoder Linear weights" in summary
    text = str(report)
    assert "64/128" in text and "0.5000" in text and "remaining decoder Linear weights: 0.5000" in text


def test_unstructured_report_is_unchanged(token_ids):
    model = tiny_model("llama")
    report = model.prune(WandaConfig(sparsity=0.5, device="cpu"), calibration_data=token_ids)
    assert report.structure is None and report.zeroed
    assert report.summary() == "sparsity 0.5000 of decoder Linear weights"
    assert "overall sparsity of decoder Linear weights: 0.5000" in str(report)


def test_zeroing_runs_reads_the_record_chain():
    structured = {"method": "l1-norm-structured", "sparsity": 0.5, "structure": {"mlp_neurons": [64]}}
    assert zeroing_runs(None) == 0
    assert zeroing_runs(structured) == 0
    mixed = {"method": "wanda", "sparsity": 0.5, "structure": {"mlp_neurons": [64]}, "previous": [structured]}
    assert zeroing_runs(mixed) == 1
    assert zeroing_runs({"method": "wanda", "sparsity": 0.5}) == 1


def test_summary_counts_emptied_layers_and_abbreviates_large_counts():
    from hf_prune.report import StructureSummary

    summary = StructureSummary(
        kept={"mlp_neurons": [0, 768], "attention_heads": [0, 9], "kv_heads": [0, 3]},
        dense={"mlp_neurons": [1536, 1536], "attention_heads": [9, 9], "kv_heads": [3, 3]},
        parameters_before=134_515_008, parameters_after=110_510_400,
    )
    assert summary.layers == (1, 2)
    assert summary.describe() == ("removed 1 of 2 layers, and in the 1 left 50.0% of MLP neurons (768 of 1536); "
                                  "parameters 134.5M -> 110.5M (0.822x)")
    assert summary.to_dict()["layers"] == {"kept": 1, "dense": 2}


def test_summary_of_dropped_layers_counts_heads_and_neurons_in_the_layers_left():
    from hf_prune.report import StructureSummary

    # three dense layers; layer 1 dropped, layer 2 lost half its neurons and a KV group
    summary = StructureSummary(
        kept={"mlp_neurons": [1536, 768], "attention_heads": [9, 6], "kv_heads": [3, 2]},
        dense={"mlp_neurons": [1536, 1536, 1536], "attention_heads": [9, 9, 9], "kv_heads": [3, 3, 3]},
        parameters_before=3_000_000, parameters_after=1_800_000, kept_layers=[0, 2],
    )
    assert summary.layers == (2, 3)
    assert summary.describe() == ("removed 1 of 3 layers, and in the 2 left 25.0% of MLP neurons (768 of 3072), "
                                  "3 of 18 attention heads, 1 of 6 KV heads; parameters 3.0M -> 1.8M (0.600x)")
    only_depth = StructureSummary(
        kept={"mlp_neurons": [1536], "attention_heads": [9], "kv_heads": [3]},
        dense={"mlp_neurons": [1536, 1536], "attention_heads": [9, 9], "kv_heads": [3, 3]},
        parameters_before=2_000_000, parameters_after=1_000_000, kept_layers=[1],
    )
    assert only_depth.describe() == "removed 1 of 2 layers; parameters 2.0M -> 1.0M (0.500x)"
