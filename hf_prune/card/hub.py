"""Publishing pruned checkpoints to the Hugging Face Hub, with their generated model card.

Everything is written to a temporary folder first (weights, config with the pruning record,
tokenizer, ``README.md`` card, per-layer plot); only when that succeeded is the repository
created (if needed), the branch created (if a ``revision`` is asked for) and the folder
uploaded in one commit. A failure while saving therefore uploads nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from transformers.utils import logging

from ..checkpoint.saving import TOKENIZER_FILES
from .render import CARD_NAME, PLOT_NAME, CardInfo, read_checkpoint, write_card

logger = logging.get_logger(__name__)


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id {repo_id!r} is not a valid hub repository id ({err}); use 'user/name'") from err


def upload_checkpoint(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Create ``repo_id`` if needed (and branch ``revision``), then upload ``folder`` in one commit."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    record = read_checkpoint(folder).record
    default_message = f"Upload model pruned with hf_prune ({record.get('method')}, {record.get('pattern')})"
    return api.upload_folder(
        repo_id=repo_id, folder_path=os.fspath(folder), repo_type="model", revision=revision,
        commit_message=commit_message or default_message, commit_description=commit_description,
        create_pr=create_pr,
    )


def push_pruned_model(
    model: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    base_model: str | None = None,
    license: str | None = None,
    notes: str | None = None,
    template: str | os.PathLike | None = None,
) -> Any:
    """Save ``model`` with its card to a temporary folder and upload it to ``repo_id``.

    Args:
        model: a pruned ``PrunedModelForCausalLM``.
        repo_id: ``"user/name"``; created if it does not exist.
        tokenizer: saved beside the weights; default: loaded from where the model was loaded.
        commit_message, commit_description: of the upload commit.
        private: create the repository private (ignored if it exists).
        token: hub token (default: the logged-in one). It is never written to the card.
        revision: branch to upload to; created from the default branch if missing.
        create_pr: open a pull request instead of committing.
        max_shard_size: as in ``save_pretrained``.
        tags, base_model, license, notes, template: for the card (see ``hf_prune.card.CardInfo``).

    Returns:
        ``huggingface_hub.CommitInfo`` of the upload.
    """
    _check_repo_id(repo_id)
    info = CardInfo(repo_id=repo_id, base_model=base_model, license=license, notes=notes, tags=tags or [],
                    template=template)
    with tempfile.TemporaryDirectory(prefix="hf_prune_push_") as tmp:
        folder = Path(tmp) / repo_id.rsplit("/", 1)[-1]
        model.save_pretrained(folder, max_shard_size=max_shard_size, model_card=info, tokenizer=tokenizer)
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            logger.warning("no tokenizer is uploaded: none was given and none could be loaded from the model's "
                           "source. Pass tokenizer=... to push_to_hub so that users can run the model")
        return upload_checkpoint(
            folder, repo_id, commit_message=commit_message, commit_description=commit_description,
            private=private, token=token, revision=revision, create_pr=create_pr,
        )


def push_saved_checkpoint(
    directory: str | os.PathLike,
    repo_id: str,
    info: CardInfo | None = None,
    **upload_kwargs: Any,
) -> Any:
    """Upload a checkpoint saved earlier, with a freshly rendered card (for ``hf-prune push``).

    The directory is left untouched: its files are linked (or copied) into a temporary
    folder, where the card and plot are rewritten before the upload.
    """
    _check_repo_id(repo_id)
    directory = Path(directory)
    read_checkpoint(directory)  # fails early, before anything is created on the hub
    info = info or CardInfo()
    info = CardInfo(repo_id=repo_id, base_model=info.base_model, license=info.license, notes=info.notes,
                    tags=info.tags, template=info.template)
    with tempfile.TemporaryDirectory(prefix="hf_prune_push_") as tmp:
        folder = Path(tmp) / directory.name
        folder.mkdir()
        for item in directory.iterdir():
            if item.name.startswith(".") or item.name in (CARD_NAME, PLOT_NAME):
                continue
            if item.is_dir():
                shutil.copytree(item, folder / item.name)
                continue
            try:
                os.link(item, folder / item.name)
            except OSError:
                shutil.copy2(item, folder / item.name)
        write_card(folder, info)
        return upload_checkpoint(folder, repo_id, **upload_kwargs)
