"""Tiny random models of every supported family, built from configs (no network).

``FAMILIES`` are the dense families every structured method supports (other tests run over
them); ``DENSE_FAMILIES``, ``MOE_FAMILIES`` and ``HYBRID_FAMILIES`` together are the families
the walker is tested on (``ALL_FAMILIES``). A family whose config class this transformers
lacks makes ``tiny_config`` raise ``MissingFamily`` (tests skip it).
"""

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
        for key in ("layer_types", "no_rope_layers"):  # per-layer lists: alternate the two layers' entries
            if isinstance(values.get(key), list):
                values[key] = [values[key][i % 2] for i in range(layers)]
        config = type(config).from_dict(values)
    return config


class MissingFamily(LookupError):
    """The installed transformers has no config class for this family."""


def _config_class(name: str) -> type:
    cls = getattr(transformers, name, None)
    if cls is None:
        raise MissingFamily(f"transformers {transformers.__version__} has no {name}")
    return cls


_ATTENTION = dict(num_key_value_heads=2, head_dim=16)
_MOE = dict(num_experts_per_tok=2)
#: Other families: config class and keyword arguments (2 layers, hidden 64, 4 experts of 32 neurons).
_MORE: dict[str, tuple[str, dict]] = {
    "gemma": ("GemmaConfig", dict(_COMMON, **_ATTENTION)),
    "ministral": ("MinistralConfig", dict(_COMMON, **_ATTENTION, sliding_window=8)),
    "qwen3_5_text": ("Qwen3_5TextConfig", dict(_COMMON, **_ATTENTION, linear_num_value_heads=4, linear_num_key_heads=2,
                                               linear_key_head_dim=16, linear_value_head_dim=16,
                                               layer_types=["linear_attention", "full_attention"])),
    "gemma3_text": ("Gemma3TextConfig", dict(_COMMON, **_ATTENTION, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"])),
    "gemma4_text": ("Gemma4TextConfig", dict(_COMMON, **_ATTENTION, global_head_dim=16, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"],
                                             hidden_size_per_layer_input=16, num_kv_shared_layers=0)),
    "phi": ("PhiConfig", dict(_COMMON, num_key_value_heads=2)),
    "smollm3": ("SmolLM3Config", dict(_COMMON, **_ATTENTION, pad_token_id=0)),
    "olmo2": ("Olmo2Config", dict(_COMMON, **_ATTENTION)),
    "olmo3": ("Olmo3Config", dict(_COMMON, **_ATTENTION, sliding_window=8)),
    "granite": ("GraniteConfig", dict(_COMMON, **_ATTENTION)),
    "glm4": ("Glm4Config", dict(_COMMON, **_ATTENTION, pad_token_id=0)),
    "cohere2": ("Cohere2Config", dict(_COMMON, **_ATTENTION, sliding_window=8)),
    "starcoder2": ("Starcoder2Config", dict(_COMMON, **_ATTENTION, sliding_window=8)),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "falcon": ("FalconConfig", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "mixtral": ("MixtralConfig", dict(_COMMON, **_ATTENTION, **_MOE, num_local_experts=4, intermediate_size=32)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_COMMON, **_ATTENTION, **_MOE, num_experts=4, moe_intermediate_size=32)),
    "olmoe": ("OlmoeConfig", dict(_COMMON, **_ATTENTION, **_MOE, num_experts=4, intermediate_size=32)),
    "gpt_oss": ("GptOssConfig", dict(_COMMON, **_ATTENTION, **_MOE, num_local_experts=4, intermediate_size=32,
                                     sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "deepseek_v3": ("DeepseekV3Config", dict(_COMMON, **_MOE, num_key_value_heads=4, n_routed_experts=4,
                                             moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                                             kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                             v_head_dim=16, n_group=2, topk_group=1)),
    "llama4_text": ("Llama4TextConfig", dict(_COMMON, **_ATTENTION, num_local_experts=4, intermediate_size=32,
                                             intermediate_size_mlp=128, interleave_moe_layer_step=1,
                                             no_rope_layers=[1, 1], num_experts_per_tok=1, attention_chunk_size=16)),
    "qwen3_next": ("Qwen3NextConfig", dict(_COMMON, **_ATTENTION, **_MOE, num_experts=4, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32, linear_num_value_heads=4,
                                           linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                                           layer_types=["linear_attention", "full_attention"])),
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(_COMMON, num_key_value_heads=2, **_MOE, num_local_experts=4,
                                                        intermediate_size=32, shared_intermediate_size=64,
                                                        layer_types=["mamba", "attention"], mamba_d_state=16,
                                                        mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1,
                                                        mamba_chunk_size=16)),
    "falcon_h1": ("FalconH1Config", dict(_COMMON, **_ATTENTION, mamba_d_state=16, mamba_n_heads=8, mamba_d_head=16,
                                         mamba_n_groups=1, mamba_chunk_size=16, mamba_d_ssm=128)),
}


def _tiny_config(family: str) -> transformers.PretrainedConfig:
    """A 2-layer config of ``family`` whose Linear input widths all divide by 8."""
    if family in _MORE:
        name, kwargs = _MORE[family]
        return _config_class(name)(**kwargs)
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
#: Dense decoder-only families (``FAMILIES`` and more).
DENSE_FAMILIES = FAMILIES + ["gemma", "ministral", "qwen3_5_text", "gemma4_text", "phi", "smollm3", "olmo2",
                             "olmo3", "granite", "glm4", "cohere2", "starcoder2", "gpt_bigcode", "falcon"]
#: Mixture-of-experts families (stacked expert weights; some with shared experts or hybrid layers).
MOE_FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "llama4_text", "qwen3_next",
                "granitemoehybrid"]
#: Hybrid families with Mamba or linear-attention mixers (qwen3_next, granitemoehybrid are MoE too).
HYBRID_FAMILIES = ["falcon_h1"]
ALL_FAMILIES = DENSE_FAMILIES + MOE_FAMILIES + HYBRID_FAMILIES


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
