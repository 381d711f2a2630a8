"""The benchmark script's summary of repeated runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "benchmark.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tool: str, seconds: float, rss: int, pattern: str = "2:4") -> dict:
    return {"tool": tool, "method": "sparsegpt", "pattern": pattern, "options": {}, "perplexity": 85.0,
            "seconds": seconds, "cpu_seconds": 2 * seconds, "peak_rss": rss, "sparsity": 0.5,
            "floor_seconds": seconds / 4}


def test_repeats_are_summarised_by_their_medians_in_first_seen_order():
    runs = [_run("hf_prune", 120.0, 3), _run("llmcompressor", 240.0, 5), _run("hf_prune", 100.0, 1),
            _run("llmcompressor", 300.0, 4), _run("hf_prune", 110.0, 2), _run("llmcompressor", 220.0, 6),
            _run("hf_prune", 50.0, 7, pattern="unstructured")]
    merged = _benchmark().median_results(runs)
    assert [(r["tool"], r["pattern"]) for r in merged] == [
        ("hf_prune", "2:4"), ("llmcompressor", "2:4"), ("hf_prune", "unstructured")]
    hf, llmc, single = merged
    assert (hf["seconds"], hf["cpu_seconds"], hf["peak_rss"], hf["repeats"]) == (110.0, 220.0, 2, 3)
    assert hf["seconds_repeats"] == [120.0, 100.0, 110.0]
    assert hf["floor_seconds"] == 27.5 and hf["floor_seconds_repeats"] == [30.0, 25.0, 27.5]
    assert (llmc["seconds"], llmc["peak_rss"]) == (240.0, 5)
    assert single["repeats"] == 1 and "seconds_repeats" not in single


def test_floor_ratio_is_the_run_over_its_forward_pass_and_left_out_where_unmeasured():
    benchmark = _benchmark()
    run = _run("hf_prune", 120.0, 3)
    assert benchmark.floor_ratio(run) == "4.00x (30.0 s)"
    del run["floor_seconds"]
    assert benchmark.floor_ratio(run) == ""
    assert benchmark.median_results([run])[0]["seconds"] == 120.0
