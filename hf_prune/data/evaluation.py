"""Perplexity on held-out text, with the windowed protocol of the pruning papers.

The text is joined and tokenized once, cut into non-overlapping windows of ``seq_len``
tokens (the remainder is dropped), and perplexity is ``exp`` of the mean next-token loss
over all predicted tokens of all windows (as in SparseGPT, Wanda and their successors).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from transformers.utils import logging

from ..errors import CalibrationError
from .calibration import check_seq_len, check_token_ids, load_text, model_limits

logger = logging.get_logger(__name__)


#: dataset names ``evaluate_perplexity`` accepts, with the split it reads
EVALUATION_DATASETS = {"wikitext2": "test", "wikitext-2": "test", "c4": "validation", "c4-sample": "train"}


def _text_of(source: Any) -> str:
    """The evaluation text: a file, a dataset name, raw text, strings or a ``datasets.Dataset``."""
    if isinstance(source, (str, os.PathLike)):
        if os.path.isfile(source):
            return load_text(source)[0]
        if isinstance(source, str) and source.lower() in EVALUATION_DATASETS:
            return load_text(source, split=EVALUATION_DATASETS[source.lower()])[0]
        if isinstance(source, str):
            return source
        raise FileNotFoundError(f"no evaluation text file at {source}")
    if isinstance(source, (list, tuple)) and all(isinstance(t, str) for t in source):
        return "\n\n".join(source)
    if hasattr(source, "column_names") and "text" in source.column_names:  # a datasets.Dataset
        return "\n\n".join(source["text"])
    raise TypeError(
        "text_or_dataset must be a string of text, a path to a text file, a dataset name ('wikitext2', 'c4'), "
        f"a list of strings or a datasets.Dataset with a 'text' column; got {type(source).__name__}"
    )


def evaluation_windows(tokenizer: Any, text_or_dataset: Any, seq_len: int = 2048,
                       max_windows: int | None = None) -> torch.Tensor:
    """The token windows ``[windows, seq_len]`` that ``evaluate_perplexity`` runs, without running them.

    Raises ``CalibrationError`` when the text holds less than one window, so a caller can
    check the evaluation text before any long pass.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    text = _text_of(text_or_dataset)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    windows = ids.numel() // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise CalibrationError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}; "
            "give more text or a smaller seq_len"
        )
    return ids[: windows * seq_len].reshape(windows, seq_len)


@torch.no_grad()
def evaluate_perplexity(model: Any, tokenizer: Any, text_or_dataset: Any, seq_len: int = 2048,
                        max_windows: int | None = None, batch_size: int = 1) -> float:
    """Perplexity of ``model`` over non-overlapping ``seq_len``-token windows of the text.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        text_or_dataset: raw text, a path to a text file, ``"wikitext2"`` (test split via
            ``datasets``), a list of strings, or a ``datasets.Dataset`` with a ``text`` column.
        seq_len: tokens per window.
        max_windows: evaluate only the first windows (``None``: all).
        batch_size: windows per forward pass.
    """
    limits = model_limits(model)
    check_seq_len(seq_len, limits)
    batches = evaluation_windows(tokenizer, text_or_dataset, seq_len, max_windows)
    check_token_ids(batches, limits, "the evaluation text")
    windows = batches.shape[0]
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    total_loss = 0.0
    total_tokens = 0
    try:
        for start in logging.tqdm(range(0, windows, batch_size), desc="Perplexity", unit="batch", leave=False):
            batch = batches[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_loss += loss.item()
            total_tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    perplexity = math.exp(total_loss / total_tokens)
    logger.info("perplexity %.3f over %d windows of %d tokens", perplexity, windows, seq_len)
    return perplexity
