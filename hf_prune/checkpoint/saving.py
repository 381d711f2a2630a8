"""Saving that never overwrites the source model, never deletes what it did not write, and
replaces an existing checkpoint as a whole.

A save writes the complete new checkpoint into a staging folder beside the target,
``.<name>.partial-<8 hex>``. Files already in the target that the new save does not write
are carried into the staging folder as hard links (copies where links are impossible),
except the previous checkpoint's own weight files (``model*.safetensors``, shards, indexes,
``compressed*``, ``pytorch_model*``, named exactly as transformers and hf_prune name them),
which the new weights replace. Then the two folders are swapped in one atomic step
(Linux ``renameat2(RENAME_EXCHANGE)``) and the old one is removed. Where the system cannot
swap atomically, the old folder is first renamed ``.<name>.replaced-<8 hex>`` and the new one
moved in; if the process dies between those two renames, the next save puts the old
checkpoint back before doing anything else.

A save that is interrupted at any point therefore leaves the target holding either the old
checkpoint, whole, or the new one, whole, and every unrelated file intact. Staging folders
left by a killed save (of our naming only, and only when no live process holds their lock)
are removed by the next save to the same target.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from transformers.utils import logging

from ..errors import OutputDirectoryError, SaveDirectoryError

logger = logging.get_logger(__name__)

#: Weight files of a checkpoint as transformers and hf_prune name them; a new save replaces these.
WEIGHT_FILE = re.compile(
    r"^(model|pytorch_model|compressed)(-\d{5,}-of-\d{5,})?\.(safetensors|bin)(\.index\.json)?$"
)
#: Our staging and set-aside folders: ``.<target name>.<kind>-<8 hex>``.
_OURS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|replaced)-[0-9a-f]{8}$")
#: Without file locks (no ``fcntl``), a staging folder counts as abandoned after this long.
_UNLOCKED_STALE_SECONDS = 24 * 3600

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


def check_target(save_directory: str | os.PathLike) -> Path:
    """The folder a save will write, resolved through symlinks; refuse a target that is not a folder.

    Raises ``SaveDirectoryError`` before anything is written if the target (or a parent) is a
    file, a broken link or otherwise not a directory.
    """
    final = Path(os.path.realpath(os.fspath(save_directory)))
    if os.path.lexists(final) and not final.is_dir():
        raise SaveDirectoryError(
            f"cannot save into {save_directory}: it exists and is not a directory. Choose a directory path (new or "
            "existing)"
        )
    for parent in final.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise SaveDirectoryError(f"cannot save into {save_directory}: {parent} is a file, not a directory")
            break
    return final


# --- locks: a live save holds one on its staging folder ------------------------------------------

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _lock(folder: Path) -> int | None:
    """Hold an exclusive lock on ``folder`` for as long as the returned descriptor stays open."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _abandoned(folder: Path) -> int | None | bool:
    """A lock descriptor if no live process holds ``folder`` (it was left by a killed save), else False."""
    if fcntl is None:  # pragma: no cover - Windows
        return None if time.time() - folder.stat().st_mtime > _UNLOCKED_STALE_SECONDS else False
    try:
        return _lock(folder)
    except OSError:
        return False


# --- file operations (module level so tests can interrupt each one) ------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> object | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        return libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None


_RENAMEAT2 = _renameat2() if os.name == "posix" else None


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step; ``False`` (nothing done) where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    result = _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(first), None, os.fspath(second))


def _carry(source: Path, destination: Path) -> None:
    """Put ``source`` at ``destination`` as hard links (copies where links are impossible), leaving it in place."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, destination, symlinks=True, copy_function=link_or_copy)
    else:
        link_or_copy(os.fspath(source), os.fspath(destination))


def _remove_tree(folder: Path) -> None:
    shutil.rmtree(folder)


# --- the save ----------------------------------------------------------------------------------------


def _clean_leftovers(final: Path) -> None:
    """Deal with folders a killed save to ``final`` left: put a set-aside old checkpoint back when the
    target is missing, and remove abandoned staging folders. Only our own naming, never a live save's."""
    leftovers = sorted(
        (entry for entry in final.parent.iterdir()
         if (match := _OURS.match(entry.name)) and match["name"] == final.name
         and entry.is_dir() and not entry.is_symlink()),
        key=lambda entry: (_OURS.match(entry.name)["kind"] != "replaced", entry.name),  # type: ignore[index]
    )
    for entry in leftovers:  # set-aside folders first: one of them may be the old checkpoint itself
        fd = _abandoned(entry)
        if fd is False:
            continue
        try:
            if _OURS.match(entry.name)["kind"] == "replaced" and not os.path.lexists(final):  # type: ignore[index]
                os.rename(entry, final)
                logger.warning("restored %s, set aside by a save that was interrupted", final)
            else:
                _remove_tree(entry)
                logger.info("removed %s, left by an interrupted save", entry.name)
        finally:
            _unlock(fd)  # type: ignore[arg-type]


def _fill_from_previous(final: Path, staging: Path) -> None:
    """Carry what ``final`` holds beside the old checkpoint into ``staging`` (which holds the new one)."""
    written = {entry.name for entry in staging.iterdir()}
    for entry in final.iterdir():
        if entry.name in written:
            continue  # replaced by the new checkpoint's file of the same name
        if WEIGHT_FILE.match(entry.name) and not (entry.is_dir() and not entry.is_symlink()):
            continue  # a weight file of the previous checkpoint: the new weights replace it
        _carry(entry, staging / entry.name)
    os.chmod(staging, stat.S_IMODE(final.stat().st_mode))


def _commit(staging: Path, final: Path) -> Path | None:
    """Move the complete ``staging`` folder to ``final``; return the folder now holding the old
    checkpoint (to remove), or ``None`` when there was none."""
    if not os.path.lexists(final):
        os.rename(staging, final)
        return None
    _fill_from_previous(final, staging)
    if _exchange(staging, final):
        return staging
    aside = final.parent / f".{final.name}.replaced-{uuid.uuid4().hex[:8]}"
    os.rename(final, aside)
    try:
        os.rename(staging, final)
    except BaseException:
        os.rename(aside, final)  # killed instead of failing here? the next save restores it
        raise
    return aside


@contextmanager
def staged_directory(save_directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh staging folder beside ``save_directory``; it replaces the target only once complete.

    If the body raises, the staging folder is deleted and ``save_directory`` is untouched.
    Files already in ``save_directory`` that the new save does not write (a tokenizer saved
    earlier, the user's notes) are kept; the previous checkpoint's weight files are replaced.
    A target that is a file is refused (``SaveDirectoryError``) before anything is written.
    """
    final = check_target(save_directory)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise SaveDirectoryError(f"cannot save into {save_directory}: {err}") from None
    _clean_leftovers(final)
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    fd = _lock(staging)
    old: Path | None = None
    try:
        try:
            yield staging
            old = _commit(staging, final)
        except BaseException:
            if os.path.lexists(staging):  # still the new, incomplete or uncommitted checkpoint
                with suppress(OSError):
                    _remove_tree(staging)
            raise
        if old is not None:  # the new checkpoint is in place: a failure from here on is only untidy
            try:
                _remove_tree(old)
            except OSError as err:
                logger.warning("saved %s, but could not remove the previous checkpoint at %s (%s); the next save "
                               "there removes it", final, old, err)
    finally:
        _unlock(fd)
