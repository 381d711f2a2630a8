"""Saving that never overwrites the source model and never leaves a half-written checkpoint."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputDirectoryError

_WEIGHT_PREFIXES = ("model.safetensors", "model-", "pytorch_model", "compressed")

#: files any saved tokenizer writes at least one of (fast, sentencepiece or BPE vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def source_directories(path: str | os.PathLike) -> set[str]:
    """The real path of the directory a model is loaded from (a file's folder), if it exists locally."""
    source = Path(os.fspath(path)).expanduser()
    if source.is_file():
        source = source.parent
    return {os.path.realpath(source)} if source.exists() else set()


def check_not_source(save_directory: str | os.PathLike, sources: set[str]) -> None:
    """Refuse to write into the directory the model was loaded from."""
    target = os.path.realpath(os.path.expanduser(os.fspath(save_directory)))
    if target in sources:
        raise OutputDirectoryError(
            f"refusing to save into {save_directory}: it is the directory this model was loaded from, and "
            "overwriting it would lose the original weights. Choose another output directory"
        )


@contextmanager
def staged_directory(save_directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh staging folder beside ``save_directory``; move its files in only on success.

    If the body raises, the staging folder is deleted and ``save_directory`` is untouched.
    Files already in ``save_directory`` that the new save does not write (a tokenizer saved
    earlier, say) are kept, except stale weight shards from an earlier save.
    """
    final = Path(save_directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not final.exists():
        os.replace(staging, final)
        return
    written = {p.name for p in staging.iterdir()}
    for old in final.iterdir():
        if old.is_file() and old.name.startswith(_WEIGHT_PREFIXES) and old.name not in written:
            old.unlink()
    for item in staging.iterdir():
        destination = final / item.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(item, destination)
    staging.rmdir()
