"""One storage layer for every stage: plain paths stay `pathlib.Path`; `s3://`, `gs://`, any fsspec URL is an
`ObjectPath` with the few path operations the stages use. Writes to an object store are whole objects only
(one PUT or a completed multipart upload, aborted on failure), so there is no rename to rely on."""
from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, TypeVar

from common.errors import UserError

T = TypeVar("T")
UPLOAD_BLOCK = 64 << 20  # multipart part size; objects below it go up in one PUT
READ_BLOCK = 8 << 20  # read-ahead of streamed reads (tar scans, sha256)
RETRIES = int(os.environ.get("REPA_STORAGE_RETRIES", "3"))  # whole-operation attempts on network errors
_lock = threading.Lock()
_filesystems: dict[tuple[str, int], Any] = {}


def is_url(loc: Any) -> bool:
    """True for a remote URL (`s3://b/k`, `gs://…`); plain paths and `file://` are local."""
    s = str(loc) if not isinstance(loc, ObjectPath) else loc.url
    return isinstance(loc, ObjectPath) or ("://" in s and not s.startswith("file://"))


def path(loc: str | os.PathLike | "ObjectPath") -> "Path | ObjectPath":
    """A plain path or file:// URL -> Path (today's local fast path); any other URL -> ObjectPath."""
    if isinstance(loc, ObjectPath):
        return loc
    s = os.fspath(loc) if not isinstance(loc, str) else loc
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    if "://" in s:
        return ObjectPath(s)
    return Path(s)


def resolve(loc: str | os.PathLike | "ObjectPath") -> "Path | ObjectPath":
    """storage.path(), made absolute when local (what logs and manifests record)."""
    p = path(loc)
    return p.resolve() if isinstance(p, Path) else p


def filesystem(protocol: str):
    """The fsspec filesystem of a protocol, one per process (credentials from the standard environment)."""
    key = (protocol, os.getpid())  # async clients do not survive fork: a new process gets its own
    with _lock:
        fs = _filesystems.get(key)
        if fs is None:
            import fsspec
            opts: dict[str, Any] = {}
            if protocol in ("s3", "s3a"):
                # AWS_ENDPOINT_URL(_S3) names an S3-compatible store (MinIO, Ceph, moto); keys and profiles come
                # from AWS_* variables / ~/.aws as botocore resolves them. Listing caches are off: other
                # processes (Ray actors, ranks) write the same prefix.
                endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                opts = {"use_listings_cache": False, "skip_instance_cache": True,
                        "config_kwargs": {"connect_timeout": 10, "read_timeout": 60,
                                          "retries": {"max_attempts": 1}}}  # s3fs retries each request itself
                if endpoint:
                    opts["endpoint_url"] = endpoint
            try:
                fs = fsspec.filesystem(protocol, **opts)
            except ImportError as e:
                raise UserError(f"{protocol}:// needs an extra package ({e}); install it with "
                                f"pip install 'repa[s3]'") from e
            except ValueError as e:
                raise UserError(f"unknown storage protocol {protocol}:// ({e})") from e
            _filesystems[key] = fs
    return fs


def _reason(e: BaseException) -> str:
    """A short reason without secrets: the exception's first line (botocore never puts keys in messages)."""
    if isinstance(e, FileNotFoundError):
        return "not found (missing bucket or object)"
    if isinstance(e, PermissionError):
        return "access denied (check AWS credentials / bucket policy)"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


def _transient(e: BaseException) -> bool:
    """Network trouble worth a retry; missing objects and denied access are not."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UserError)):
        return False
    name = type(e).__name__
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        w in name for w in ("Connect", "Timeout", "ServerDisconnected", "ClientPayload", "ResponseStreaming"))


def call(url: str, what: str, fn: Callable[[], T], retries: int = RETRIES) -> T:
    """Run one storage operation; transient errors are retried with backoff, the rest become one-line errors."""
    delay = 0.5
    for attempt in range(retries):
        try:
            return fn()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - every client error becomes one line naming the URL
            if _transient(e) and attempt + 1 < retries:
                time.sleep(delay * (1 + random.random()))
                delay *= 2
                continue
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise UserError(f"cannot {what} {url}: no space left on device") from e
            raise UserError(f"cannot {what} {url}: {_reason(e)}") from e
    raise AssertionError("unreachable")


class _Stat:
    def __init__(self, size: int):
        self.st_size = size


class ObjectPath:
    """A remote object or prefix: pathlib-style joins and names, fsspec for the rest; errors name the URL."""

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

    def __truediv__(self, part: str) -> "ObjectPath":
        return ObjectPath(f"{self.protocol}://{(self._p / str(part)).as_posix()}")

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
        return ObjectPath(f"{self.protocol}://{self._p.parent.as_posix()}")

    def with_name(self, name: str) -> "ObjectPath":
        return ObjectPath(f"{self.protocol}://{self._p.with_name(name).as_posix()}")

    def with_suffix(self, suffix: str) -> "ObjectPath":
        return ObjectPath(f"{self.protocol}://{self._p.with_suffix(suffix).as_posix()}")

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

    def iterdir(self) -> Iterator["ObjectPath"]:
        names = call(self.url, "list", lambda: self.fs.ls(self.key, detail=False))
        for n in sorted(names):
            if n.rstrip("/") != self.key:
                yield ObjectPath(f"{self.protocol}://{n.rstrip('/')}")

    def find(self) -> list[tuple["ObjectPath", int]]:
        """Every object under this prefix with its size, sorted (one recursive listing)."""
        found = call(self.url, "list", lambda: self.fs.find(self.key, detail=True))
        return [(ObjectPath(f"{self.protocol}://{k}"), int(v.get("size") or 0)) for k, v in sorted(found.items())
                if v.get("type") == "file"]

    def glob(self, pattern: str) -> Iterator["ObjectPath"]:
        hits = call(self.url, "list", lambda: self.fs.glob(f"{self.key}/{pattern}"))
        for h in sorted(hits):
            yield ObjectPath(f"{self.protocol}://{h}")

    # --- reads ---------------------------------------------------------------------------------------------
    def open(self, mode: str = "rb", **kw):
        if "r" not in mode:
            raise ValueError("write an object with manifests.io.atomic_path/atomic_open (whole objects only)")
        return call(self.url, "read", lambda: self.fs.open(self.key, mode, block_size=READ_BLOCK, **kw))

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

    def unlink(self, missing_ok: bool = False) -> None:
        def rm():
            try:
                self.fs.rm_file(self.key)
            except FileNotFoundError:
                if not missing_ok:
                    raise
        call(self.url, "delete", rm)


def open_read(p: "Path | ObjectPath", mode: str = "rb"):
    """A readable binary file for a local path or an object (buffered, seekable)."""
    return p.open(mode) if isinstance(p, ObjectPath) else open(p, mode)


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


def abort_uploads(prefix: ObjectPath) -> int:
    """Abort unfinished multipart uploads under `prefix` (left by a killed writer); S3 only; returns how many."""
    if prefix.protocol not in ("s3", "s3a"):
        return 0
    fs = prefix.fs
    key_prefix = prefix.key.partition("/")[2]

    def abort() -> int:
        n = 0
        for up in fs.list_multipart_uploads(prefix.bucket):
            if up.get("Key", "").startswith(key_prefix):
                fs.call_s3("abort_multipart_upload", Bucket=prefix.bucket, Key=up["Key"], UploadId=up["UploadId"])
                n += 1
        return n
    return call(prefix.url, "list uploads of", abort)


def copy_to_local(p: ObjectPath, dest: Path) -> None:
    """Download an object to `dest` atomically (used by the read cache)."""
    tmp = dest.with_name(f".tmp-{dest.name}.{os.getpid()}.{os.urandom(4).hex()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        call(p.url, "download", lambda: p.fs.get_file(p.key, str(tmp)))
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
