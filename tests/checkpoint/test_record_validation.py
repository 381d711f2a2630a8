"""Checkpoints whose ``config.json`` pruning record was edited raise the library's own errors.

Loading them, or running the CLI on them, gives a ``HfPruneError`` (one line, exit 2 from the
CLI), never a raw ``AttributeError``, ``KeyError``, ``OverflowError`` or ``RecursionError``;
a record without ``measured_sparsity`` is refused unless the check is turned off.
"""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_models import tiny_model

from hf_prune import AutoPrunedModelForCausalLM, HfPruneError, MagnitudeConfig
from hf_prune.cli import main
from hf_prune.errors import PruningRecordError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("record") / "ok"
    model = tiny_model("llama")
    model.prune(MagnitudeConfig(sparsity=0.5))
    model.save_pretrained(folder, model_card=False)
    return folder


def _crafted(saved, tmp_path, edit) -> str:
    folder = tmp_path / "crafted"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _nested_initial(depth: int) -> dict:
    data: dict = {"method": "wanda"}
    for _ in range(depth):
        data = {"method": "barber", "initial": data}
    return data


CRAFTED = {
    "measured_sparsity is a list": lambda c: c["pruning_config"].update(measured_sparsity=[1]),
    "modules map to strings": lambda c: c["pruning_config"]["measured_sparsity"].update(modules={"a": "x"}),
    "structure is a list": lambda c: c["pruning_config"].update(structure=[1]),
    "structure lists strings": lambda c: c["pruning_config"].update(
        structure={"mlp_neurons": ["a"], "attention_heads": [4], "kv_heads": [2]}),
    "previous is a string": lambda c: c["pruning_config"].update(previous="runs"),
    "previous nests previous": lambda c: c["pruning_config"].update(previous=[{"method": "wanda", "previous": []}]),
    "sparsity overflows float": lambda c: c["pruning_config"].update(sparsity=10**400),
    "seed overflows int64": lambda c: c["pruning_config"].update(seed=10**400),
    "500 nested initial configs": lambda c: c["pruning_config"].update(_nested_initial(500)),
    "40 nested lists": lambda c: c["pruning_config"].update(source={"x": json.loads("[" * 40 + "]" * 40)}),
    "record is a list": lambda c: c.update(pruning_config=[1]),
    "compressed names a path": lambda c: c["pruning_config"].update(compressed={
        "format": "bitmask", "version": 1, "files": {"compressed.safetensors": "../model.safetensors"}}),
    "layer_sparsity holds a dict": lambda c: c["pruning_config"].update(layer_sparsity=[{}]),
    "evaluation nests a list": lambda c: c["pruning_config"].update(evaluation={"after": [1]}),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_records_raise_the_library_error(saved, tmp_path, case):
    folder = _crafted(saved, tmp_path, CRAFTED[case])
    with pytest.raises(HfPruneError) as caught:
        AutoPrunedModelForCausalLM.from_pretrained(folder)
    assert isinstance(caught.value, ValueError)


def test_a_record_without_measured_sparsity_is_not_silently_unchecked(saved, tmp_path):
    folder = _crafted(saved, tmp_path, lambda c: c["pruning_config"].pop("measured_sparsity"))
    with pytest.raises(PruningRecordError, match="measured_sparsity is missing.*verify_pruning=False"):
        AutoPrunedModelForCausalLM.from_pretrained(folder)
    assert AutoPrunedModelForCausalLM.from_pretrained(folder, verify_pruning=False).is_pruned


@pytest.mark.parametrize("case", ["measured_sparsity is a list", "500 nested initial configs", "record is a list"])
def test_cli_turns_a_crafted_record_into_one_line_and_exit_2(saved, tmp_path, capsys, monkeypatch, case):
    folder = _crafted(saved, tmp_path, CRAFTED[case])
    text = tmp_path / "text.txt"
    text.write_text("evaluation text " * 50)

    class ByteTokenizer:
        def __call__(self, text, **kwargs):
            return {"input_ids": [b % 96 for b in text.encode()]}

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: ByteTokenizer())
    assert main(["eval", "--model", folder, "--eval-text", str(text), "--eval-seq-len", "16"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "hf-prune: error: " in line]
    assert len(errors) == 1 and errors[0].startswith("hf-prune: error: ") and err.rstrip().endswith(errors[0])
