"""Image sets to evaluate: samples manifests, ADM .npz batches, features manifests and image folders.

Each opens cheaply (validation, count, size, checksum) and then yields uint8 (B, H, W, 3) batches in file
order, decoding PNG/JPEG in a thread pool (PIL releases the GIL while it decodes).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from manifests import MANIFEST_NAME, index_shard, load_manifest, read_member, sha256_file, storage
from common import UserError
from common.errors import os_error_message

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


@dataclass
class ImageSet:
    """A readable, validated set of uint8 RGB images of one size."""
    kind: str  # 'samples-manifest' | 'features-manifest' | 'npz' | 'folder'
    path: Path
    count: int
    size: tuple[int, int]  # (H, W) of every image this set yields
    sha256: str  # identity of the input for cache keys
    transform: str = "none"  # e.g. 'adm-center-crop@256'
    items: Sequence[Any] = field(default_factory=list, repr=False)  # what _decode_chunk reads, in order
    decode: Callable[[Sequence[Any]], np.ndarray] | None = field(default=None, repr=False)

    def describe(self) -> str:
        return f"{self.kind} {self.path} ({self.count} images, {self.size[0]}x{self.size[1]})"

    def limit(self, n: int | None, flag: str = "--num-samples") -> "ImageSet":
        """Keep the first n images; fewer than n is a UserError."""
        if n is None:
            return self
        if n <= 0:
            raise UserError(f"{flag} must be positive, got {n}")
        if self.count < n:
            raise UserError(f"{self.path} holds {self.count} images, fewer than {flag} {n}")
        if n == self.count:
            return self
        return ImageSet(self.kind, self.path, n, self.size, self.sha256, f"{self.transform};first={n}",
                        self.items, self.decode)

    def batches(self, batch_size: int, num_workers: int = 4) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) batches in file order."""
        if self.kind == "npz":
            yield from _prefetch(_npz_batches(self.path, self.count, batch_size), depth=4)
            return
        assert self.decode is not None
        chunks = (self.items[i:i + batch_size] for i in range(0, self.count, batch_size))
        with ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="decode") as pool:
            pending: deque = deque()
            try:
                for chunk in chunks:
                    pending.append(pool.submit(self.decode, chunk))
                    if len(pending) >= 2 * max(1, num_workers):
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()


def _prefetch(gen: Iterator[np.ndarray], depth: int) -> Iterator[np.ndarray]:
    """Run `gen` in a background thread, `depth` items ahead (the zip read overlaps the forward pass)."""
    import queue
    import threading
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def fill():
        try:
            for item in gen:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(e)
    t = threading.Thread(target=fill, name="npz-reader", daemon=True)
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
            t.join(0.01)


# ---- decoding ---------------------------------------------------------------------------------------------

def decode_image(data: bytes | Path, what: str, crop: int | None = None, size: tuple[int, int] | None = None,
                 rule: str = "adm-center") -> np.ndarray:
    """Decode one PNG/JPEG to uint8 (H, W, 3); optional centre crop by the named rule (manifests.preprocess.CROPS:
    ADM's for ImageNet, U-ViT's for MS-COCO); the size must then equal `size`."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            if im.mode not in EIGHT_BIT_MODES:
                raise UserError(f"{what}: image mode {im.mode} is not 8-bit (expected uint8 RGB)")
            im.load()
            if crop is not None and im.size != (crop, crop):
                from manifests.preprocess import CROPS
                im = CROPS[rule](im, crop)
            arr = np.asarray(im.convert("RGB"))
    except UserError:
        raise
    except FileNotFoundError as e:
        raise UserError(f"image not found: {what}") from e
    except OSError as e:
        if e.errno is not None:
            raise UserError(f"cannot read image {os_error_message(e, what)}") from e
        raise UserError(f"{what}: corrupt or unreadable image ({e})") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types on broken files: one line naming the file
        raise UserError(f"{what}: corrupt or unreadable image ({type(e).__name__}: {e})") from e
    if size is not None and arr.shape[:2] != tuple(size):
        raise UserError(f"{what}: image is {arr.shape[0]}x{arr.shape[1]}, the set's images are "
                        f"{size[0]}x{size[1]} (mixed image sizes)")
    return arr


def _stack(arrs: list[np.ndarray]) -> np.ndarray:
    return np.stack(arrs)  # (B, H, W, 3)


# ---- ADM .npz ---------------------------------------------------------------------------------------------

def _npz_member(zf: zipfile.ZipFile, name: str, path: Path):
    try:
        return zf.open(f"{name}.npy")
    except KeyError as e:
        have = ", ".join(sorted(n.removesuffix(".npy") for n in zf.namelist())) or "nothing"
        raise UserError(f"{path} has no '{name}' array (it holds: {have})") from e


def _npz_header(f, path: Path, name: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    try:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = readers[version](f)
    except ValueError as e:
        raise UserError(f"{path}: '{name}' is not a valid .npy array ({e})") from e
    return shape, dtype, fortran


def open_npz_images(path: Path) -> ImageSet:
    """An ADM-style batch: `arr_0` uint8 (N, H, W, 3), read in batches straight from the zip (no pickle)."""
    _require_file(path)
    try:
        with zipfile.ZipFile(path) as zf, _npz_member(zf, "arr_0", path) as f:
            shape, dtype, fortran = _npz_header(f, path, "arr_0")
    except zipfile.BadZipFile as e:
        raise UserError(f"{path} is not a valid .npz file ({e})") from e
    if dtype.hasobject:
        raise UserError(f"{path}: 'arr_0' is an object array; refusing to unpickle it (allow_pickle=False)")
    if dtype != np.uint8:
        raise UserError(f"{path}: 'arr_0' has dtype {dtype}, expected uint8 images")
    if len(shape) != 4 or shape[-1] != 3 or fortran:
        raise UserError(f"{path}: 'arr_0' has shape {list(shape)}, expected (N, H, W, 3) in C order")
    if shape[0] == 0:
        raise UserError(f"{path}: 'arr_0' holds no images")
    return ImageSet("npz", path, int(shape[0]), (int(shape[1]), int(shape[2])), _member_sha256(path, "arr_0"))


def _member_sha256(path: Path, name: str) -> str:
    """sha256 of one array of an .npz: the images' identity, whatever statistics sit beside them."""
    h = hashlib.sha256()
    with zipfile.ZipFile(path) as zf, _npz_member(zf, name, path) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _npz_batches(path: Path, count: int, batch_size: int) -> Iterator[np.ndarray]:
    with zipfile.ZipFile(path) as zf, _npz_member(zf, "arr_0", path) as f:
        shape, _, _ = _npz_header(f, path, "arr_0")
        per = int(np.prod(shape[1:]))
        for i in range(0, count, batch_size):
            n = min(batch_size, count - i)
            buf = bytearray(f.read(n * per))  # writable: torch refuses to wrap read-only memory
            if len(buf) != n * per:
                raise UserError(f"{path}: 'arr_0' ends early at image {i} (truncated file?)")
            yield np.frombuffer(buf, np.uint8).reshape(n, *shape[1:])  # (B, H, W, 3)


def load_npz_arrays(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named arrays that exist in an .npz, loaded without pickle."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {}
            for n in names:
                if n in z.files:
                    out[n] = z[n]
            return out
    except ValueError as e:  # object arrays need pickle
        raise UserError(f"{path}: holds an object array; refusing to unpickle it (allow_pickle=False)") from e
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path} is not a readable .npz file ({e})") from e


# ---- manifests --------------------------------------------------------------------------------------------

def _manifest_sha(root: Path) -> str:
    return sha256_file(root / MANIFEST_NAME)


def _member_reader(m, ext: str) -> list[tuple[Path, str, int, int]]:
    """(shard, key, offset, size) for member `ext` of every sample, in manifest order."""
    out = []
    for shard in m.shard_paths():
        for key, members in index_shard(shard).items():
            if ext not in members:
                raise UserError(f"shard {shard}: sample '{key}' has no '.{ext}' member")
            out.append((shard, key, *members[ext]))
    if len(out) != m.num_samples:
        raise UserError(f"manifest {m.path} lists {m.num_samples} samples but its shards hold {len(out)}")
    return out


def _read_members(items: Sequence[tuple[Path, str, int, int]]) -> list[tuple[str, bytes]]:
    out, handles = [], {}
    try:
        for shard, key, off, size in items:
            if shard not in handles:
                handles[shard] = open(shard, "rb")  # noqa: SIM115 - closed below
            out.append((f"{shard}:{key}", read_member(handles[shard], off, size, f"{shard}:{key}")))
    finally:
        for h in handles.values():
            h.close()
    return out


def open_samples_manifest(path: Path) -> ImageSet:
    """A samples manifest: PNG members `png` of shape [H, W, 3] uint8."""
    m = load_manifest(path, kind="samples")
    spec = m.field("png", shape=[None, None, 3], dtype="uint8")
    size = (int(spec["shape"][0]), int(spec["shape"][1]))
    items = _member_reader(m, "png")

    def decode(chunk):
        return _stack([decode_image(data, what, size=size) for what, data in _read_members(chunk)])
    return ImageSet("samples-manifest", m.root, len(items), size, _manifest_sha(m.root), "none", items, decode)


def _resolve_source(src: str, root: Path, extra_roots: Sequence[Path] = ()) -> Path:
    p = Path(src)
    if p.is_absolute():
        return p
    for base in (root, *extra_roots):
        if (base / p).exists():
            return base / p
    return p


def open_features_manifest(path: Path) -> ImageSet:
    """A features manifest: each sample's `json.source` image, centre-cropped at the manifest's resolution by the
    manifest's own crop rule (`preprocess.crop`: adm-center for ImageNet, uvit-center for MS-COCO)."""
    import json
    m = load_manifest(path, kind="features")
    res = m.preprocess.get("resolution")
    if not isinstance(res, int) or res <= 0:
        raise UserError(f"manifest {m.path}: 'repa.preprocess.resolution' is missing or not a positive integer")
    from manifests.preprocess import CROPS
    rule = m.preprocess.get("crop", "adm-center")
    if rule not in CROPS:
        raise UserError(f"manifest {m.path}: unknown preprocess.crop {rule!r} (known: {', '.join(CROPS)})")
    # Sources are relative to the extraction's --source folder (recorded by `pipeline extract`), or to the manifest.
    given = str((m.created_by.get("config") or {}).get("source") or "")
    bases = [Path(given)] if given and not storage.is_url(given) and Path(given).is_dir() else []
    names = []
    for what, data in _read_members(_member_reader(m, "json")):
        try:
            names.append(str(json.loads(data.decode())["source"]))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{what}: json member has no 'source' path") from e
    if given and storage.is_url(given) and "{" not in given:  # images in a bucket: fetch the listed ones once
        want = set(names)
        bases = [storage.path(given).mirror(lambda listing: sorted(k for k in listing if k in want))]
    sources = [_resolve_source(n, m.root, bases) for n in names]
    missing = [s for s in sources if not s.is_file()]
    if missing:
        raise UserError(f"manifest {m.path}: {len(missing)} source image(s) not found, e.g. {missing[0]}")

    def decode(chunk):
        return _stack([decode_image(p, str(p), crop=res, size=(res, res), rule=rule) for p in chunk])
    return ImageSet("features-manifest", m.root, len(sources), (res, res), _manifest_sha(m.root),
                    f"{rule}-crop@{res}", sources, decode)


# ---- folders ----------------------------------------------------------------------------------------------

def _hash_files(files: Sequence[Path], root: Path, workers: int) -> str:
    """sha256 over (relative name, content sha256) of every file: the folder's identity."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = list(pool.map(sha256_file, files))
    h = hashlib.sha256()
    for f, d in zip(files, digests):
        h.update(f"{f.relative_to(root).as_posix()}\t{d}\n".encode())
    return h.hexdigest()


def open_folder(path: Path, crop: int | None = None, num_workers: int = 4, rule: str = "adm-center") -> ImageSet:
    """PNG/JPEG files under `path` (sorted, recursive). crop=None: all must share the first image's size."""
    from PIL import Image
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise UserError(f"folder {path} holds no .png/.jpg/.jpeg images")
    if crop is None:
        try:
            with Image.open(files[0]) as im:
                w, h = im.size
        except Exception as e:  # noqa: BLE001 - one line naming the file
            raise UserError(f"{files[0]}: corrupt or unreadable image ({e})") from e
        size = (h, w)
    else:
        size = (crop, crop)

    def decode(chunk):
        return _stack([decode_image(p, str(p), crop=crop, size=size, rule=rule) for p in chunk])
    transform = "none" if crop is None else f"{rule}-crop@{crop}"
    return ImageSet("folder", path, len(files), size, _hash_files(files, path, num_workers), transform,
                    files, decode)


# ---- dispatch ---------------------------------------------------------------------------------------------

def _require_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"not found: {path}")
    if not path.is_file():
        raise UserError(f"expected a file: {path}")


def manifest_kind(path: Path) -> str | None:
    """'samples' / 'features' for a manifest (file or folder holding one), else None."""
    from manifests import read_json
    mp = path / MANIFEST_NAME if path.is_dir() else path
    if mp.name != MANIFEST_NAME or not mp.is_file():
        return None
    raw = read_json(mp, "manifest")
    kind = raw.get("repa", {}).get("kind") if isinstance(raw, dict) else None
    return kind if kind in ("samples", "features") else "unknown"


def open_images(path: str | Path, *, crop: int | None = None, num_workers: int = 4, what: str = "input",
                rule: str = "adm-center") -> ImageSet:
    """Open any supported image set; `crop` centre-crops folder images whose size differs, by `rule`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if p.is_file() and p.suffix == ".npz":
        return open_npz_images(p)
    kind = manifest_kind(p)
    if kind == "samples":
        return open_samples_manifest(p)
    if kind == "features":
        return open_features_manifest(p)
    if kind == "unknown":
        return open_samples_manifest(p)  # load_manifest names what is wrong with it
    if p.is_dir():
        return open_folder(p, crop=crop, num_workers=num_workers, rule=rule)
    raise UserError(f"{what} {p}: expected an .npz, a manifest (or its folder), or a folder of images")
