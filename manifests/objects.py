"""The object-store side of manifests/storage.py: `ObjectPath` (s3://, gs://, any fsspec URL) with the same methods
as a local `storage.LocalPath`. Writes are whole objects only (one PUT or a completed multipart upload, aborted on
failure), so there is no rename to rely on. Callers never import this module: they call `storage.path()`."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import tempfile
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

from common.errors import UserError, free_space
from .retry import call  # the one retry policy
from .object_checks import UPLOAD_BLOCK, RangeReader, abort_uploads, confine, same_bytes

READ_BLOCK = 8 << 20  # read-ahead of streamed reads (tar scans, sha256)
TMP_MARK = ".tmp-"  # every half-written local file (a download, an atomic write) carries this; re-runs delete them
_lock = threading.Lock()
_filesystems: dict[tuple[str, int], Any] = {}


def filesystem(protocol: str):
    """The fsspec filesystem of a protocol, one per process (credentials from the standard environment)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    key = (protocol, os.getpid(), endpoint)  # async clients do not survive fork: a new process gets its own
    with _lock:
        fs = _filesystems.get(key)
        if fs is None:
            import fsspec
            opts: dict[str, Any] = {}
            if protocol in ("s3", "s3a"):
                # AWS_ENDPOINT_URL(_S3) names an S3-compatible store (MinIO, Ceph, moto); keys and profiles come
                # from AWS_* variables / ~/.aws as botocore resolves them. Listing caches are off: other
                # processes (Ray actors, ranks) write the same prefix.
                opts = {"use_listings_cache": False, "skip_instance_cache": True,
                        "config_kwargs": {"connect_timeout": 10, "read_timeout": 60,
                                          "retries": {"total_max_attempts": 1}}}  # retries: manifests/retry.py
                if endpoint:
                    opts["endpoint_url"] = endpoint
            try:
                fs = fsspec.filesystem(protocol, **opts)
            except ImportError as e:
                raise UserError(f"{protocol}:// needs an extra package ({e}); install it with "
                                f"pip install 'repa[s3]'") from e
            except ValueError as e:
                raise UserError(f"unknown storage protocol {protocol}:// ({e})") from e
            if hasattr(fs, "retries"):
                fs.retries = 1  # s3fs would retry SlowDown alone, unlogged; one policy retries everything instead
            _filesystems[key] = fs
    return fs


class _Stat:
    def __init__(self, size: int):
        self.st_size = size


class ObjectPath:
    """A remote object or prefix: pathlib-style joins and names, fsspec for the rest; errors name the URL."""
    is_remote = True

    def __init__(self, url: str):
        proto, _, rest = url.partition("://")
        self.protocol = proto.lower()
        self._p = PurePosixPath(rest.strip("/") or "/")
        if not rest.strip("/"):
            raise UserError(f"URL {url!r} names no bucket")

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self._p.as_posix()}"

    @property
    def key(self) -> str:  # bucket/key, as fsspec wants it
        return self._p.as_posix()

    @property
    def bucket(self) -> str:
        return self._p.parts[0]

    @property
    def fs(self):
        return filesystem(self.protocol)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: "ObjectPath") -> bool:
        return self.url < other.url

    def _at(self, p: PurePosixPath) -> "ObjectPath":
        return ObjectPath(f"{self.protocol}://{p.as_posix()}")

    def __truediv__(self, part: str) -> "ObjectPath":
        return self._at(self._p / str(part))

    joinpath = __truediv__

    @property
    def name(self) -> str:
        return self._p.name

    @property
    def stem(self) -> str:
        return self._p.stem

    @property
    def suffix(self) -> str:
        return self._p.suffix

    @property
    def parent(self) -> "ObjectPath":
        return self._at(self._p.parent)

    def with_name(self, name: str) -> "ObjectPath":
        return self._at(self._p.with_name(name))

    def with_suffix(self, suffix: str) -> "ObjectPath":
        return self._at(self._p.with_suffix(suffix))

    def resolve(self) -> "ObjectPath":
        return self

    def relative_to(self, other: "ObjectPath") -> PurePosixPath:
        return self._p.relative_to(other._p)

    # --- queries -------------------------------------------------------------------------------------------
    def _info(self) -> dict | None:
        def info():
            try:
                return self.fs.info(self.key)
            except FileNotFoundError:
                return None
        return call(self.url, "read", info)

    def exists(self) -> bool:
        return self._info() is not None

    def is_file(self) -> bool:
        i = self._info()
        return i is not None and i.get("type") == "file"

    def is_dir(self) -> bool:
        i = self._info()
        return i is not None and i.get("type") == "directory"

    def stat(self) -> _Stat:
        i = self._info()
        if i is None:
            raise UserError(f"not found: {self.url}")
        return _Stat(int(i.get("size") or 0))

    def require_file(self, what: str = "file") -> None:
        """A one-line UserError unless this object exists; a missing bucket is named as such."""
        if not self.is_file():
            self.check_bucket()
            raise UserError(f"{what} not found: {self}")

    def iterdir(self) -> Iterator["ObjectPath"]:
        names = call(self.url, "list", lambda: self.fs.ls(self.key, detail=False))
        for n in sorted(names):
            if n.rstrip("/") != self.key:
                yield self._at(PurePosixPath(n.rstrip("/")))

    def find(self) -> list[tuple["ObjectPath", int]]:
        """Every object under this prefix with its size, sorted (one recursive listing)."""
        found = call(self.url, "list", lambda: self.fs.find(self.key, detail=True))
        return [(self._at(PurePosixPath(k)), int(v.get("size") or 0)) for k, v in sorted(found.items())
                if v.get("type") == "file"]

    def listing(self) -> dict[str, dict]:
        """Relative name -> the store's info (size, ETag) of every object under this prefix (one listing)."""
        found = call(self.url, "list", lambda: self.fs.find(self.key, detail=True))
        return {str(PurePosixPath(k).relative_to(self.key)): v for k, v in sorted(found.items())
                if v.get("type") == "file"}

    def file_sizes(self, names: Iterable[str]) -> dict[str, int | None]:
        """Size of each relative name under this prefix (None: missing), from one listing, not a HEAD each."""
        have = {str(o.relative_to(self)): n for o, n in self.find()}
        return {n: have.get(n) for n in names}

    def glob(self, pattern: str) -> Iterator["ObjectPath"]:
        hits = call(self.url, "list", lambda: self.fs.glob(f"{self.key}/{pattern}"))
        for h in sorted(hits):
            yield self._at(PurePosixPath(h))

    # --- reads ---------------------------------------------------------------------------------------------
    def open(self, mode: str = "rb", **kw):
        if "r" not in mode:
            raise ValueError("write an object with manifests.io.atomic_path/atomic_open (whole objects only)")
        info = self._info()
        if info is None:
            raise UserError(f"cannot read {self.url}: not found (missing bucket or object)")
        # Each block is one ranged GET under the retry policy, so a fault mid-stream costs one block, not the read.
        return io.BufferedReader(RangeReader(self, int(info.get("size") or 0)), READ_BLOCK)

    def read_bytes(self) -> bytes:
        return call(self.url, "read", lambda: self.fs.cat_file(self.key))

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_range(self, offset: int, size: int) -> bytes:
        data = call(self.url, "read", lambda: self.fs.cat_file(self.key, start=offset, end=offset + size))
        if len(data) != size:
            raise UserError(f"cannot read {self.url}: object ended early at byte {offset + len(data)} "
                            f"(truncated?)")
        return data

    def download(self, dest: Path, size: int | None = None) -> Path:
        """Copy this object to the local file `dest` atomically, unless a copy of `size` bytes is already there
        (size None: always copy)."""
        if size is not None and dest.is_file() and dest.stat().st_size == size:
            return dest
        tmp = dest.with_name(f"{TMP_MARK}{dest.name}.{os.getpid()}.{os.urandom(4).hex()}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            call(self.url, "download", lambda: self.fs.get_file(self.key, str(tmp)))
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if size is not None and dest.stat().st_size != size:
            raise UserError(f"cannot read {self}: download ended early (truncated object?)")
        return dest

    def mirror(self, select: Callable[[dict[str, int]], list[str]] | None = None) -> Path:
        """A local copy in the mirror cache, reused while sizes match: the object itself, or under a prefix the
        names `select({name: size})` picks (every object if None)."""
        local = mirror_dir(self.url)
        if self.is_file():
            return self.download(local / self.name, self.stat().st_size)
        self.check_bucket()
        listing = {str(o.relative_to(self)): n for o, n in self.find()}
        names = sorted(listing) if select is None else select(listing)
        dests = [confine(local, name, self.url) for name in names]  # every key checked before anything is written
        local.mkdir(parents=True, exist_ok=True)
        for name, dest in zip(names, dests):
            (self / name).download(dest, listing.get(name))
        return local

    # --- writes: whole objects -----------------------------------------------------------------------------
    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Prefixes need no creation; the bucket must exist (never created behind the user's back)."""
        self.check_bucket()

    def check_bucket(self) -> None:
        """A one-line error if the bucket does not exist (or the endpoint is wrong)."""
        bucket = f"{self.protocol}://{self.bucket}"
        ok = call(bucket, "open bucket", lambda: self.fs.exists(self.bucket))
        if not ok:
            raise UserError(f"bucket not found: {bucket} (create it first, or check AWS_ENDPOINT_URL)")

    def write_bytes(self, data: bytes) -> None:
        """One PUT of the whole object."""
        call(self.url, "write", lambda: self.fs.pipe_file(self.key, data))

    def upload(self, local: str | os.PathLike) -> None:
        """Upload a finished local file as one object: one PUT, or a multipart upload that is completed only
        after every part arrived and aborted on any failure, so a half-written object never becomes visible."""
        def put():
            f = self.fs.open(self.key, "wb", block_size=UPLOAD_BLOCK)
            try:
                with open(local, "rb") as src:
                    shutil.copyfileobj(src, f, UPLOAD_BLOCK)
            except BaseException:
                with contextlib.suppress(Exception):
                    f.discard()  # aborts the multipart upload: its parts never form an object
                f.closed = True  # nothing more may be flushed by close()/__del__
                raise
            f.close()
        call(self.url, "write", put)

    @contextlib.contextmanager
    def atomic_file(self) -> Iterator[Path]:
        """A local staging file that becomes this object in one whole upload on clean exit; deleted either way."""
        tmp = staging_dir() / f"{self.name}.{os.getpid()}.{os.urandom(4).hex()}.staging"
        try:
            try:
                yield tmp
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):  # the staging disk, not the bucket, is full
                    raise UserError(f"cannot write {self.url}: no space left in the staging folder "
                                    f"{staging_dir()} ({free_space(staging_dir())} free; set REPA_STAGING_DIR)") from e
                raise
            self.upload(tmp)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def mirror_up(self, local: Path, suffix: str = "") -> int:
        """Upload the files under `local` ending in `suffix` that this prefix lacks or holds with other bytes
        (checksums compared, not sizes); returns how many."""
        have = self.listing()
        n = 0
        for p in sorted(local.rglob(f"*{suffix}")):
            rel = p.relative_to(local).as_posix()
            if not p.is_file() or p.name.startswith(TMP_MARK) or same_bytes(have.get(rel), p):
                continue
            (self / rel).upload(p)
            n += 1
        return n

    def clean_partial_writes(self, before: float | None = None) -> int:
        """Nothing half-written is ever visible under a prefix: drop dead writers' staging files and abort the
        unfinished multipart uploads under this prefix begun before `before` (the caller's lease start: what stale
        holders left; None: all of them); returns how many."""
        return remove_stale_staging() + abort_uploads(self, before)

    def unlink(self, missing_ok: bool = False) -> None:
        def rm():
            try:
                self.fs.rm_file(self.key)
            except FileNotFoundError:
                if not missing_ok:
                    raise
        call(self.url, "delete", rm)


def mirror_root() -> Path:
    """Where mirrors of remote inputs live: REPA_REMOTE_CACHE, else ~/.cache/repa/remote (XDG_CACHE_HOME
    respected)."""
    base = os.environ.get("REPA_REMOTE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
        / "repa" / "remote"
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p


def mirror_dir(url: str) -> Path:
    """The local mirror folder of one URL."""
    return mirror_root() / hashlib.sha256(url.encode()).hexdigest()[:24]


def staging_dir() -> Path:
    """Local folder for objects being built before their single upload (TMPDIR or REPA_STAGING_DIR)."""
    d = Path(os.environ.get("REPA_STAGING_DIR") or Path(tempfile.gettempdir()) / "repa-staging")
    d.mkdir(parents=True, exist_ok=True)
    return d


def remove_stale_staging() -> int:
    """Delete staging files of writers that are no longer alive (their pid is in the name)."""
    n = 0
    for p in staging_dir().glob("*.staging"):
        try:
            pid = int(p.name.split(".")[-3])
        except (ValueError, IndexError):
            continue
        if not pid_alive(pid):
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
    return n


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs on this machine (a staging file's owner, a cache writer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
