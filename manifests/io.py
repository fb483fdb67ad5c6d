"""Atomic writes and checksums: a reader never sees half a file."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from . import storage
from .storage import TMP_MARK, fsync_dir, tmp_path_for  # noqa: F401 - re-exported: the atomic-write names
from common.errors import UserError, as_user_error


def is_tmp(path: str | os.PathLike) -> bool:
    return Path(path).name.startswith(TMP_MARK)


def remove_tmp_files(folder: str | os.PathLike, before: float | None = None) -> int:
    """Delete half-written files that dead writers left in `folder` (on an object store: their staging files and
    the unfinished uploads begun before `before`, the caller's lease start); returns how many."""
    return storage.path(folder).clean_partial_writes(before)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "") -> Iterator[Path]:
    """Yield a local tmp path for a writer that needs a file name (h5py, tarfile); on clean exit it becomes `path`
    whole (fsync + os.replace, or one upload to an object store). On any error the tmp file is removed and an
    OSError becomes a one-line UserError naming `path` (`what` is appended, e.g. a hint)."""
    p = storage.path(path)
    with as_user_error("cannot write", p, f" {what}" if what else ""), p.atomic_file() as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a tmp file next to `path`; on clean exit fsync and os.replace it into place (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON or raise a one-line UserError naming the file."""
    p = storage.path(path)
    with as_user_error(f"cannot read {what}", p):
        p.require_file(what)
        text = p.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {p} is not valid JSON (line {e.lineno}: {e.msg})") from e


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with storage.path(path).open("rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> storage.StoragePath:
    """Create `path` if needed (on an object store: check the bucket) and prove a write there with a probe file,
    deleted again; else a one-line UserError."""
    p = storage.path(path)
    with as_user_error(f"{what} is not writable:", p):
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f"{TMP_MARK}probe-{os.getpid()}-{os.urandom(4).hex()}"
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    return p
