"""Tiny random models of every supported family, built from configs (no network)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from hf_prune import AutoPrunedModelForCausalLM

VOCAB = 96
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128)


def tiny_config(family: str, layers: int = 2) -> transformers.PretrainedConfig:
    """A config of ``family`` with ``layers`` decoder layers (default 2) whose Linear widths all divide by 8."""
    config = _tiny_config(family)
    if layers != 2:
        values = config.to_dict()
        values["num_hidden_layers"] = layers
        if isinstance(values.get("layer_types"), list):  # alternate the two layers' types
            values["layer_types"] = [values["layer_types"][i % 2] for i in range(layers)]
        config = type(config).from_dict(values)
    return config


def _tiny_config(family: str) -> transformers.PretrainedConfig:
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
        return cls(**_COMMON, num_key_value_heads=2, head_dim=16)
    if family == "gemma2":
        return transformers.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=8)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"])
    if family == "phi3":
        return transformers.Phi3Config(**_COMMON, num_key_value_heads=2, pad_token_id=0)
    if family == "opt":
        return transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "opt", "gpt2", "gpt_neox"]


def tiny_model(family: str, seed: int = 0, layers: int = 2):
    """A randomly initialised pruning-capable model of ``family`` in float32, eval mode."""
    torch.manual_seed(seed)
    model = AutoPrunedModelForCausalLM.from_config(tiny_config(family, layers))
    return model.eval()


def tiny_tokenizer():
    """A character-level fast tokenizer with ids below ``VOCAB`` (printable ASCII, one id per character), which
    ``AutoTokenizer.from_pretrained`` loads back from a folder it was saved to."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [chr(code) for code in range(33, 127)]
    vocab = {c: i for i, c in enumerate(characters)} | {"[UNK]": len(characters)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def save_tiny(directory: Path, family: str = "qwen3", seed: int = 0) -> Path:
    """A tiny random model of ``family`` and its tokenizer saved to ``directory``: a complete local model."""
    tiny_model(family, seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
