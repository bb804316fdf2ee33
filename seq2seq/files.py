"""Files that survive a crash: every write goes to a temporary file that is flushed to disk and
renamed over the target, so a reader (or a run killed at any moment) sees the old file or the
new one, never half of one."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from seq2seq.errors import UserError


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside `path` to write; on success it is fsynced and renamed over
    `path` (and the folder fsynced, so the rename itself survives a power cut)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # one fixed name: a write killed midway leaves no pile of them
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some systems cannot open a folder: the rename is still atomic
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_writable(path: str | Path, what: str = "output") -> None:
    """Fail now, before any work, where `path` could not be written later."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; the {what} needs a file path")
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{path}: not writable")


def check_output_folder(folder: Path) -> None:
    """A training run's folder: writable, tried rather than guessed (read-only mounts, quotas)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{folder}: cannot write the run's files there ({e.strerror or e})") from None


def check_free_space(folder: Path, needed_bytes: int) -> None:
    import shutil

    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise UserError(f"{folder}: {free / 2**20:.0f} MiB free on its disk, the run's files need about "
                        f"{needed_bytes / 2**20:.0f} MiB: free some space or choose another --output")
