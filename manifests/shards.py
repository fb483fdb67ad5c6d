"""Shard format helpers: sample keys, member naming, deterministic tar writing, indexed reading."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

import numpy as np

from . import storage
from common.errors import UserError, check
from common.faults import kill_point
from .io import atomic_open, sha256_file

KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# Member extensions (DESIGN §2). Encoder fields are "<encoder>.npy"; flipped twins "<field>.flip.npy".
CLS, JSON, PNG, LATENT = "cls", "json", "png", "latent"


def sanitize_key(stem: str) -> str:
    """Turn a file stem into a valid sample key: no dots, no separators."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", stem)
    return key or "_"


def check_key(key: str) -> str:
    check(bool(KEY_RE.match(key)), f"invalid sample key {key!r}: keys must be non-empty and use only [A-Za-z0-9_-]")
    return key


def npy_ext(field: str, flip: bool = False) -> str:
    """Member extension of an array field: 'latent.npy', 'dinov2-vit-b.flip.npy'."""
    return f"{field}.flip.npy" if flip else f"{field}.npy"


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes, what: str = "array") -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:  # object arrays need pickle: refuse them
        raise UserError(f"{what}: not a plain .npy array ({e})") from e


def read_npy_header(data: bytes, what: str = "array") -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran order, header bytes) of a .npy member from its first bytes, without reading the
    array; anything that is not a plain .npy header is a one-line UserError naming `what`."""
    import numpy.lib.format as npformat
    head = io.BytesIO(data)
    try:
        version = npformat.read_magic(head)
        read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, fortran, dtype = read(head)
    except ValueError as e:
        raise UserError(f"{what} is not a plain .npy array ({e})") from e
    return tuple(shape), dtype, bool(fortran), head.tell()


def decode_member(ext: str, data: bytes, what: str = "member") -> Any:
    """Decode one member by extension: .npy arrays, cls ints, json, png/jpg images (uint8 HWC)."""
    if ext.endswith("npy"):
        return decode_npy(data, what)
    if ext == CLS:
        return int(data.decode().strip())
    if ext == JSON:
        return json.loads(data.decode())
    if ext in ("png", "jpg", "jpeg"):
        from PIL import Image
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    return data


def encode_member(ext: str, value: Any) -> bytes:
    """Encode a value for member `ext` (the inverse of decode_member for npy/cls/json/bytes)."""
    if isinstance(value, bytes):
        return value
    if ext.endswith("npy"):
        return encode_npy(np.asarray(value))
    if ext == CLS:
        return str(int(value)).encode()
    if ext == JSON:
        return json.dumps(value, sort_keys=True).encode()
    if ext == "txt" and isinstance(value, str):  # a caption (sample shards of text-to-image), UTF-8
        return value.encode("utf-8")
    raise TypeError(f"cannot encode {type(value).__name__} for member .{ext}")


@dataclass
class ShardInfo:
    """What a finished shard looks like: enough for a manifest entry and indexed reads."""
    path: Path
    keys: list[str]
    sha256: str
    bytes: int
    index: dict[str, dict[str, list[int]]]  # key -> ext -> [data offset, size]


def write_shard(path: str | os.PathLike, samples: list[Mapping[str, Any]]) -> ShardInfo:
    """Write samples (dicts with '__key__' and ext -> value) as a byte-deterministic tar, atomically.

    Members are in sample order then sorted extension order, with mtime 0, uid/gid 0 and mode 0o444,
    so the same samples always give the same bytes.
    """
    path = storage.path(path)
    index: dict[str, dict[str, list[int]]] = {}
    keys: list[str] = []
    with atomic_open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                key = check_key(str(s["__key__"]))
                check(key not in index, f"duplicate sample key {key!r} in shard {path.name}")
                keys.append(key)
                index[key] = {}
                for ext in sorted(k for k in s if not k.startswith("__")):
                    data = encode_member(ext, s[ext])
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size, ti.mtime, ti.mode = len(data), 0, 0o444
                    ti.uid = ti.gid = 0
                    ti.uname = ti.gname = ""
                    header = len(ti.tobuf(tar.format, tar.encoding, tar.errors))
                    index[key][ext] = [tar.offset + header, ti.size]
                    tar.addfile(ti, io.BytesIO(data))
        f.flush()
        # Checksum the local tmp bytes before they move (an object store would otherwise be read back).
        digest, nbytes = sha256_file(f.name), os.fstat(f.fileno()).st_size
        kill_point("tar-before-rename")  # test hook: the whole tar is in its tmp file, not yet renamed
    return ShardInfo(path=path, keys=keys, sha256=digest, bytes=nbytes, index=index)


def _split_member(name: str, shard: str | os.PathLike) -> tuple[str, str]:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or name.startswith("/"):
        raise UserError(f"shard {shard}: unsafe member name {name!r} (absolute or '..')")
    base = p.name
    key, dot, ext = base.partition(".")
    check(bool(dot) and bool(ext), f"shard {shard}: member {name!r} has no extension")
    prefix = str(p.parent) + "/" if str(p.parent) not in ("", ".") else ""
    return prefix + key, ext


def index_shard(path: str | os.PathLike) -> dict[str, dict[str, list[int]]]:
    """Scan tar headers only and return key -> ext -> [data offset, size], in file order."""
    index: dict[str, dict[str, list[int]]] = {}
    try:
        with open_tar(path) as tar:
            for ti in tar:
                if not ti.isfile():
                    continue
                key, ext = _split_member(ti.name, path)
                index.setdefault(key, {})[ext] = [ti.offset_data, ti.size]
    except (tarfile.TarError, EOFError) as e:
        raise UserError(f"shard {path} is corrupt or truncated ({e})") from e
    except FileNotFoundError as e:
        raise UserError(f"shard not found: {path}") from e
    return index


def iter_shard(path: str | os.PathLike, decode: bool = True) -> Iterator[dict[str, Any]]:
    """Yield samples of one shard in file order as {'__key__': key, ext: value}."""
    cur: dict[str, Any] | None = None
    try:
        with open_tar(path) as tar:
            for ti in tar:
                if not ti.isfile():
                    continue
                key, ext = _split_member(ti.name, path)
                if cur is None or cur["__key__"] != key:
                    if cur is not None:
                        yield cur
                    cur = {"__key__": key}
                f = tar.extractfile(ti)
                data = f.read() if f is not None else b""
                cur[ext] = decode_member(ext, data, f"{path}:{ti.name}") if decode else data
    except (tarfile.TarError, EOFError) as e:
        raise UserError(f"shard {path} is corrupt or truncated ({e})") from e
    except FileNotFoundError as e:
        raise UserError(f"shard not found: {path}") from e
    if cur is not None:
        yield cur


@contextlib.contextmanager
def open_tar(path: str | os.PathLike) -> Iterator[tarfile.TarFile]:
    """A tar reader over a local file or an object (read ahead in large blocks); closes both on exit."""
    with storage.path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        yield tar


def read_member(f, offset: int, size: int, what: str = "member") -> bytes:
    """Read `size` bytes at `offset` from an open shard file."""
    f.seek(offset)
    data = f.read(size)
    check(len(data) == size, f"{what}: shard ended early (truncated file?)")
    return data


def iter_member(shards, ext: str) -> Iterator[tuple[str, str, bytes | None]]:
    """(shard, key, bytes of member `ext` or None if the sample has none) for every sample, in shard and file order;
    reads only that member (tar headers, then one read each), e.g. a sample set's captions."""
    for shard in shards:
        members = index_shard(shard)
        with storage.path(shard).open("rb") as f:
            for key, mem in members.items():
                yield str(shard), key, (read_member(f, *mem[ext], f"{shard}:{key}") if ext in mem else None)
