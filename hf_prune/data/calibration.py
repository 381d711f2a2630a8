"""Calibration data: from a dataset name, a text file, strings or token ids to a token batch.

Text is concatenated, tokenized once, cut into non-overlapping windows of ``seq_len``
tokens, and ``num_samples`` windows are drawn with a seeded generator.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..errors import CalibrationError

logger = logging.get_logger(__name__)

BUNDLED_C4 = Path(__file__).parent / "c4_sample.txt"

CalibrationInput = str | os.PathLike | list | torch.Tensor


@dataclass
class CalibrationSet:
    """Token ids ``[num_samples, seq_len]`` and a JSON-ready description of where they came from."""

    input_ids: torch.Tensor
    record: dict[str, Any]


@dataclass(frozen=True)
class ModelLimits:
    """What calibration tokens a model can take: ``context`` positions, token ids below ``vocab``
    (``None`` when the model does not say)."""

    context: int | None = None
    vocab: int | None = None


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def model_limits(model: Any) -> ModelLimits:
    """The context length (``max_position_embeddings`` or its family's name) and the input vocabulary
    (rows of the input embedding, else ``vocab_size``) of a transformers model."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    context = next((v for key in _CONTEXT_KEYS if isinstance(v := getattr(config, key, None), int)
                    and not isinstance(v, bool) and v > 0), None)
    vocab = None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(getattr(embeddings, "num_embeddings", None), int):
        vocab = embeddings.num_embeddings
    elif isinstance(getattr(config, "vocab_size", None), int):
        vocab = config.vocab_size
    return ModelLimits(context, vocab)


def check_seq_len(seq_len: int, limits: ModelLimits | None) -> None:
    """Raise ``CalibrationError`` if ``seq_len`` is longer than the model's context."""
    if limits is not None and limits.context is not None and seq_len > limits.context:
        raise CalibrationError(
            f"seq_len={seq_len} is longer than the model's context of {limits.context} tokens "
            "(config.max_position_embeddings): positions past it have no learned embedding or were never trained. "
            f"Use seq_len <= {limits.context}"
        )


def check_token_ids(ids: torch.Tensor, limits: ModelLimits | None, source: str) -> None:
    """Raise ``CalibrationError`` if a token id is negative or not below the model's vocabulary size."""
    if limits is None or limits.vocab is None or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= limits.vocab:
        raise CalibrationError(
            f"calibration tokens from {source} include id {low if low < 0 else high}, outside the model's vocabulary "
            f"[0, {limits.vocab}): the tokenizer or the token ids do not belong to this model. Pass the model's own "
            "tokenizer, or ids below its vocab_size"
        )


def _hub_dataset_text(name: str, split: str) -> str:
    """Text of a standard corpus from the Hugging Face Hub through ``datasets``."""
    try:
        import datasets
    except ImportError as err:
        raise CalibrationError(f"loading {name!r} needs {DATASETS_MISSING}, or pass a path to a .txt/.jsonl file "
                               "instead") from err
    if name == "c4":
        shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
        data = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
        return "\n\n".join(data["text"][:5000])
    if name == "wikitext2":
        data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return "\n\n".join(data["text"])
    raise CalibrationError(f"no hub dataset is known as {name!r}")


def _file_text(path: Path) -> str:
    try:
        return _read_file_text(path)
    except UnicodeDecodeError as err:
        raise CalibrationError(
            f"{path.name} is not UTF-8 text (byte {err.start} is {err.object[err.start:err.start + 1]!r}): convert it "
            "to UTF-8 (e.g. iconv -t UTF-8) or pass the text as a list of strings"
        ) from None


def _read_file_text(path: Path) -> str:
    if path.suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CalibrationError(f"{path}:{number} is not valid JSON ({err.msg})") from err
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise CalibrationError(f"{path}:{number} needs a string field 'text'")
                texts.append(row["text"])
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


KNOWN_DATASETS = ("c4", "c4-sample", "wikitext2")

#: what to install for the hub datasets (hf_prune is installed from its source, not from PyPI)
DATASETS_MISSING = ("the `datasets` package, which is not installed: pip install datasets (or install hf_prune with "
                    "its `eval` extra: pip install -e '.[eval]' in the hf_prune source folder)")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES",
                                                                                                  "TRUE")


def load_text(spec: str | os.PathLike, split: str = "train") -> tuple[str, str]:
    """Return ``(text, source description)`` for a dataset name or a file path.

    ``"c4"`` falls back to the bundled C4 sample, with a warning that names the cause (the
    ``datasets`` package is not installed, or the Hub could not be reached or is switched off
    by ``HF_HUB_OFFLINE``); the description says so and ends up in the pruning record.
    """
    path = Path(os.fspath(spec)).expanduser()
    if path.is_file():
        return _file_text(path), f"file:{path.name}"
    name = str(spec).lower().replace("-raw", "").replace("wikitext-2", "wikitext2")
    if name == "c4-sample":
        return BUNDLED_C4.read_text(encoding="utf-8"), "c4-sample (bundled, 584 documents)"
    if name in ("c4", "wikitext2"):
        error: Exception | None = None
        if importlib.util.find_spec("datasets") is None:
            cause, short = f"it needs {DATASETS_MISSING}", "`datasets` not installed"
        else:
            try:
                return _hub_dataset_text(name, split), f"{name} (hub, {split})"
            except Exception as err:  # noqa: BLE001 - the hub is unreachable, switched off, or refused
                error = err
                how = "HF_HUB_OFFLINE is set, so the Hub was not asked" if _hub_offline() else "the Hub was asked"
                cause = f"loading it from the Hugging Face Hub failed ({how}; {type(err).__name__}: {err})"
                short = "hub unreachable"
        if name != "c4":
            raise CalibrationError(
                f"could not load {name!r}: {cause}. Pass a path to a local .txt/.jsonl file instead"
            ) from error
        logger.warning("could not load allenai/c4 (calibration='c4'): %s; using the C4 sample bundled with hf_prune "
                       "instead (pass calibration='c4-sample' to use it without this warning)", cause)
        return BUNDLED_C4.read_text(encoding="utf-8"), f"c4-sample (bundled; {short})"
    raise CalibrationError(
        f"calibration {str(spec)!r} is neither an existing file nor a known dataset "
        f"({', '.join(KNOWN_DATASETS)}); pass a path to a .txt or .jsonl file, a list of strings, "
        "or a LongTensor of token ids"
    )


def tokenize_windows(
    text: str, tokenizer: Any, num_samples: int, seq_len: int, seed: int, source: str,
    limits: ModelLimits | None = None,
) -> CalibrationSet:
    """Tokenize ``text`` once and draw ``num_samples`` non-overlapping ``seq_len`` windows.

    With ``limits``, ``seq_len`` is checked against the model's context before tokenizing and
    the token ids against its vocabulary after (``CalibrationError``).
    """
    check_seq_len(seq_len, limits)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    check_token_ids(ids, limits, source)
    available = ids.numel() // seq_len
    if available < 1:
        raise CalibrationError(
            f"calibration text from {source} has {ids.numel()} tokens, fewer than one sample of "
            f"seq_len={seq_len}; give more text or lower seq_len"
        )
    count = min(num_samples, available)
    if count < num_samples:
        logger.warning(
            "calibration text from %s holds only %d windows of %d tokens; using %d samples instead of %d",
            source, available, seq_len, count, num_samples,
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:count].sort().values
    windows = ids[: available * seq_len].reshape(available, seq_len)[chosen]
    record = {
        "source": source, "num_samples": count, "seq_len": seq_len, "seed": seed, "tokens_available": ids.numel(),
    }
    return CalibrationSet(windows.contiguous(), record)


def build_calibration(
    data: CalibrationInput | None, tokenizer: Any, spec: str, num_samples: int, seq_len: int, seed: int,
    limits: ModelLimits | None = None,
) -> CalibrationSet:
    """Turn the ``calibration_data`` argument (or, if ``None``, the config's ``spec``) into tokens.

    ``limits`` (see ``model_limits``) are the model's context and vocabulary: a longer
    ``seq_len`` or an id outside the vocabulary raises ``CalibrationError`` before anything runs.
    """
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.long, torch.int32, torch.int64):
            raise CalibrationError(
                f"calibration_data as a tensor must be token ids of shape [num_samples, seq_len] and an "
                f"integer dtype, got shape {tuple(data.shape)} and {data.dtype}"
            )
        if data.numel() == 0:
            raise CalibrationError("calibration_data is an empty tensor")
        check_seq_len(data.shape[1], limits)
        check_token_ids(data, limits, "the token tensor")
        record = {"source": "token tensor", "num_samples": data.shape[0], "seq_len": data.shape[1]}
        return CalibrationSet(data.long(), record)
    if tokenizer is None:
        raise CalibrationError(
            "a tokenizer is needed to turn calibration text into tokens: pass tokenizer=..., or token ids as "
            "calibration_data"
        )
    if isinstance(data, (list, tuple)):
        if not data or not all(isinstance(t, str) for t in data):
            raise CalibrationError("calibration_data as a list must hold non-empty strings")
        return tokenize_windows("\n\n".join(data), tokenizer, num_samples, seq_len, seed, f"{len(data)} strings",
                                limits)
    text, source = load_text(data if data is not None else spec)
    return tokenize_windows(text, tokenizer, num_samples, seq_len, seed, source, limits)
