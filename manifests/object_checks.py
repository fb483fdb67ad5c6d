"""Checks and helpers beside manifests/objects.py: the retrying ranged reader, key confinement, S3 ETags, and the
clean-up of unfinished multipart uploads by whole path segments."""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path, PurePosixPath
from typing import Any

from common.errors import UserError
from .retry import call

UPLOAD_BLOCK = int(os.environ.get("REPA_UPLOAD_BLOCK", 64 << 20))  # multipart part size (S3's floor: 5 MiB)


class RangeReader(io.RawIOBase):
    """A seekable raw reader of one object whose every read is a ranged GET through `call()`."""

    def __init__(self, obj: Any, size: int):
        super().__init__()
        self.obj, self.size, self.pos = obj, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        b[:n] = self.obj.read_range(self.pos, n)
        self.pos += n
        return n


def confine(root: Path, rel: str, url: str) -> Path:
    """`root / rel` for an object key `rel`, refused (one line, nothing written) if the key would leave `root`
    (absolute, or with a '..' part): a hostile bucket must not write outside the local mirror."""
    parts = PurePosixPath(rel).parts
    dest = Path(root, *parts) if parts else Path(root)
    if not parts or rel.startswith("/") or ".." in parts or not dest.resolve().is_relative_to(Path(root).resolve()):
        raise UserError(f"refusing object key {rel!r} under {url}: it would be written outside the local mirror "
                        f"{root}")
    return dest


def etag_of(local: Path, block: int | None = None) -> str:
    """The S3 ETag our upload of `local` gets: md5 of one PUT, or md5 of the part md5s + '-N' for a multipart
    upload in `block`-sized parts (UPLOAD_BLOCK)."""
    block = block or UPLOAD_BLOCK
    size = local.stat().st_size
    parts = []
    with open(local, "rb") as f:
        while chunk := f.read(block):
            parts.append(hashlib.md5(chunk).digest())
    if size < block:
        return (parts[0] if parts else hashlib.md5(b"").digest()).hex()
    return f"{hashlib.md5(b''.join(parts)).hexdigest()}-{len(parts)}"


def same_bytes(info: dict | None, local: Path) -> bool:
    """Whether a listed object holds the bytes of `local`: its ETag matches (S3), else size AND, where the store
    gives no checksum, nothing more can be told (sizes then)."""
    if info is None or int(info.get("size") or 0) != local.stat().st_size:
        return False
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    if not etag:
        return True  # a store without checksums in its listing: the size is all there is
    return etag == etag_of(local)




def under(key: str, prefix: str) -> bool:
    """Whether object key `key` lies under `prefix`, compared by whole path segments ('feats' holds 'feats/x',
    never 'feats-512/x')."""
    prefix = prefix.strip("/")
    return not prefix or key == prefix or key.startswith(prefix + "/")


def abort_uploads(prefix: Any, before: float | None = None) -> int:
    """Abort unfinished multipart uploads under `prefix` (whole path segments) begun before the time `before`
    (None: any), i.e. left by a killed writer; S3 only; returns how many."""
    if prefix.protocol not in ("s3", "s3a"):
        return 0
    fs = prefix.fs
    key_prefix = prefix.key.partition("/")[2]

    def stale(up: dict) -> bool:
        started = up.get("Initiated")
        return before is None or started is None or started.timestamp() < before

    def abort() -> int:
        n = 0
        for up in fs.list_multipart_uploads(prefix.bucket):
            if under(up.get("Key", ""), key_prefix) and stale(up):
                fs.call_s3("abort_multipart_upload", Bucket=prefix.bucket, Key=up["Key"], UploadId=up["UploadId"])
                n += 1
        return n
    return call(prefix.url, "list uploads of", abort)
