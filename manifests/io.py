"""Atomic writes and checksums: a reader never sees half a file."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from . import storage
from common.errors import UserError, os_error_message

TMP_MARK = ".tmp-"  # every half-written file carries this in its name; re-runs delete them


def tmp_path_for(path: str | os.PathLike) -> Path:
    """A unique tmp name next to `path`, recognisable by TMP_MARK."""
    p = Path(path)
    return p.with_name(f"{TMP_MARK}{p.name}.{os.getpid()}.{os.urandom(4).hex()}")


def is_tmp(path: str | os.PathLike) -> bool:
    return Path(path).name.startswith(TMP_MARK)


def remove_tmp_files(folder: str | os.PathLike) -> int:
    """Delete half-written tmp files left by a killed writer; returns how many."""
    if storage.is_url(folder):  # nothing half-written is visible there: drop dead staging files and uploads
        return storage.remove_stale_staging() + storage.abort_uploads(storage.path(folder))
    n = 0
    for p in Path(folder).glob(f"{TMP_MARK}*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "") -> Iterator[Path]:
    """Yield a tmp path next to `path` for a writer that needs a file name (h5py, tarfile); on clean exit fsync
    it and os.replace it into place. On any error the tmp file is removed and an OSError becomes a one-line
    UserError naming `path` (`what` is appended, e.g. a hint). For an object-store URL the tmp file is local
    and becomes the object in one whole upload (manifests.storage)."""
    if storage.is_url(path):
        with _staged(storage.path(path)) as tmp:
            yield tmp
        return
    path = Path(path)
    hint = f" {what}" if what else ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create folder {os_error_message(e, path.parent)}{hint}") from e
    tmp = tmp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"cannot write {os_error_message(e, path)}{hint}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def _staged(obj: "storage.ObjectPath") -> Iterator[Path]:
    """A local staging file that is uploaded whole to `obj` on clean exit and deleted either way."""
    tmp = storage.staging_dir() / f"{obj.name}.{os.getpid()}.{os.urandom(4).hex()}.staging"
    try:
        yield tmp
        obj.upload(tmp)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a tmp file next to `path`; on clean exit fsync and os.replace it into place (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename durable (best effort; not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON or raise a one-line UserError naming the file."""
    if storage.is_url(path):
        obj = storage.path(path)
        if not obj.is_file():
            obj.check_bucket()
            raise UserError(f"{what} not found: {obj}")
        text = obj.read_text()
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{what} {obj} is not valid JSON (line {e.lineno}: {e.msg})") from e
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise UserError(f"{what} not found: {path}") from e
    except IsADirectoryError as e:
        raise UserError(f"{what} is a folder, expected a JSON file: {path}") from e
    except OSError as e:
        raise UserError(f"cannot read {what} {os_error_message(e, path)}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON (line {e.lineno}: {e.msg})") from e


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with storage.open_read(storage.path(path)) as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` if needed and check we can write there, else a one-line UserError."""
    if storage.is_url(path):  # the bucket must exist and take a write (a probe object, deleted again)
        obj = storage.path(path)
        obj.mkdir()
        probe = obj / f"{TMP_MARK}probe-{os.getpid()}-{os.urandom(4).hex()}"
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
        return obj  # type: ignore[return-value]
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=p, prefix=TMP_MARK + "probe-", delete=True)
        probe.close()
    except OSError as e:
        raise UserError(f"{what} is not writable: {os_error_message(e, p)}") from e
    return p
