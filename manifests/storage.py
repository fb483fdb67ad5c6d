"""One storage entry point for every stage: `storage.path(loc)` gives a path object, and callers ask it to read,
write, list or mirror; whether `loc` is a folder or an object-store URL is decided here, once.

A plain path or `file://` URL is a `LocalPath` (a `pathlib.Path`, so every pathlib call still works); `s3://`,
`gs://` or any fsspec URL is an `ObjectPath` (manifests/objects.py). Both answer the same calls:

| call | what it does |
|---|---|
| `/`, `name`, `stem`, `suffix`, `parent`, `with_name`, `relative_to`, `resolve` | pathlib names and joins |
| `exists()`, `is_file()`, `is_dir()`, `stat().st_size` | queries |
| `require_file(what)` | a one-line UserError unless the file exists (names a missing bucket as such) |
| `iterdir()`, `glob(pattern)`, `find()`, `file_sizes(names)` | listing; `find()` is recursive with sizes |
| `open("rb")`, `read_bytes()`, `read_text()`, `read_range(offset, size)` | reads |
| `write_bytes(data)`, `atomic_file()` | writes; `atomic_file()` yields a local tmp file that becomes this path whole |
| `mkdir()`, `unlink(missing_ok)`, `clean_partial_writes()` | folders, removal, leftovers of a killed writer |
| `mirror(select)`, `mirror_up(local, suffix)` | a local copy (a local path is its own), and upload of missing files |
| `is_remote` | for the few callers that must know (read concurrency, the ImageFolder rule) |
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

from common.errors import UserError
from .object_checks import confine, under  # noqa: F401 - the key and prefix rules
from .objects import TMP_MARK, ObjectPath
# Re-exported for callers outside pipeline/ and manifests/: tests and scripts make buckets with filesystem(), the
# pipeline S3 test looks into staging_dir(), evaluation/features.py asks pid_alive().
from .objects import filesystem, pid_alive, staging_dir  # noqa: F401


class LocalPath(type(Path())):  # type: ignore[misc] - the platform's concrete Path class
    """A local file or folder: pathlib plus the calls an `ObjectPath` has (module docstring)."""
    is_remote = False

    def require_file(self, what: str = "file") -> None:
        if self.is_dir():
            raise UserError(f"{what} is a folder, expected a file: {self}")
        if not self.is_file():
            raise UserError(f"{what} not found: {self}")

    def find(self) -> list[tuple["LocalPath", int]]:
        """Every file under this folder with its size, sorted."""
        out = []
        for dirpath, _, files in os.walk(self):
            for name in files:
                p = type(self)(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    out.append((p, p.stat().st_size))
        return sorted(out)

    def file_sizes(self, names: Iterable[str]) -> dict[str, int | None]:
        """Size of each relative name under this folder (None: missing): one stat each."""
        out: dict[str, int | None] = {}
        for n in names:
            try:
                st = (self / n).stat()
                out[n] = st.st_size if (self / n).is_file() else None
            except (FileNotFoundError, NotADirectoryError):
                out[n] = None
        return out

    def read_range(self, offset: int, size: int) -> bytes:
        """`size` bytes at `offset`; a short read is an error, as for an object."""
        with open(self, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise UserError(f"cannot read {self}: file ended early at byte {offset + len(data)} (truncated?)")
        return data

    def mirror(self, select: Callable[[dict[str, int]], list[str]] | None = None) -> "LocalPath":
        """A local path is its own local copy."""
        return self

    def mirror_up(self, local: Path, suffix: str = "") -> int:
        """Copy the files under `local` ending in `suffix` that this folder lacks (by size); returns how many."""
        if self.exists() and Path(local).exists() and self.samefile(local):
            return 0
        n = 0
        for p in sorted(Path(local).rglob(f"*{suffix}")):
            dest = self / p.relative_to(local).as_posix()
            if not p.is_file() or p.name.startswith(TMP_MARK) or (dest.is_file() and
                                                                   dest.stat().st_size == p.stat().st_size):
                continue
            with dest.atomic_file() as tmp:
                shutil.copyfile(p, tmp)
            n += 1
        return n

    @contextlib.contextmanager
    def atomic_file(self) -> Iterator["LocalPath"]:
        """A tmp file next to this path; on clean exit it is fsynced and renamed into place, on error deleted."""
        self.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path_for(self)
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(self.parent)

    def clean_partial_writes(self, before: float | None = None) -> int:
        """Delete half-written tmp files that dead writers left in this folder (a live writer's pid, in the name,
        keeps its file; `before` is for the object-store twin); returns how many."""
        n = 0
        for p in self.glob(f"{TMP_MARK}*"):
            pid = tmp_owner(p.name)
            if pid is not None and pid != os.getpid() and pid_alive(pid):
                continue  # a live writer on this machine: not ours to delete
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
        return n


StoragePath = LocalPath | ObjectPath  # what storage.path() returns (for annotations)


def path(loc: str | os.PathLike | ObjectPath) -> LocalPath | ObjectPath:
    """The path object of a plain path (~ expanded), a `file://` URL (both local) or an object-store URL."""
    if isinstance(loc, (ObjectPath, LocalPath)):
        return loc
    s = os.fspath(loc) if not isinstance(loc, str) else loc
    if s.startswith("file://"):
        return LocalPath(s[len("file://"):])
    if "://" in s:
        return ObjectPath(s)
    return LocalPath(s).expanduser()  # '~/data' from a config file, as a shell would give it


def resolve(loc: str | os.PathLike | ObjectPath) -> LocalPath | ObjectPath:
    """storage.path(), made absolute when local (what logs and manifests record)."""
    return path(loc).resolve()


def tmp_path_for(p: str | os.PathLike) -> LocalPath:
    """A unique tmp name next to `p`, recognisable by TMP_MARK (and carrying the writer's pid)."""
    p = LocalPath(p)
    return p.with_name(f"{TMP_MARK}{p.name}.{os.getpid()}.{os.urandom(4).hex()}")


def tmp_owner(name: str) -> int | None:
    """The writer pid in a tmp name ('.tmp-x.tar.<pid>.<hex>', '.tmp-probe-<pid>-<hex>'), or None."""
    m = re.search(r"\.(\d+)\.[0-9a-f]{8}$", name) or re.match(rf"{re.escape(TMP_MARK)}probe-(\d+)-", name)
    return int(m.group(1)) if m else None


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename durable (best effort; not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- kept for callers in evaluation/ until they use the path API (to be removed) ---------------------------------
def is_url(loc: object) -> bool:
    """Deprecated: ask `storage.path(loc).is_remote`."""
    return isinstance(loc, ObjectPath) or (isinstance(loc, (str, os.PathLike)) and path(loc).is_remote)


def open_read(p: str | os.PathLike | ObjectPath, mode: str = "rb"):
    """Deprecated: `storage.path(p).open("rb")`."""
    return path(p).open(mode)
