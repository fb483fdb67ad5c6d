"""The shard-manifest contract (DESIGN §2): dataclasses, writing and validation."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

from . import storage
from .codecs import field_codec
from common.errors import UserError, as_user_error, check
from .io import atomic_write_json, read_json, sha256_file

SCHEMA_VERSION = 1
WIDS_VERSION = 1
MANIFEST_NAME = "manifest.json"
KINDS = ("features", "samples")
CONTEXT_CODEC = "text-context"  # a caption-context field (DESIGN §9): KEY.<field>.npy (K, L, D), K captions

@dataclass
class ShardEntry:
    """One tar shard: `url` is relative to the manifest's folder."""
    url: str
    nsamples: int
    sha256: str
    bytes: int

@dataclass
class Manifest:
    """A validated manifest; `root` is the folder holding manifest.json."""
    root: Path
    name: str
    shardlist: list[ShardEntry]
    kind: str
    num_samples: int
    fields: dict[str, dict[str, Any]]
    classes: list[str] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    created_by: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. sampler settings of a samples manifest

    @property
    def path(self) -> Path:
        return self.root / MANIFEST_NAME

    def shard_paths(self) -> list[Path]:
        return [self.root / s.url for s in self.shardlist]

    def field(self, name: str, *, shape: Sequence[int | None] | None = None, dtype: str | None = None,
              hint: str = "") -> dict[str, Any]:
        """Return field `name`, checking it exists and has the expected shape/dtype (None = any size)."""
        hint = f" ({hint})" if hint else ""
        if name not in self.fields:
            have = ", ".join(sorted(self.fields)) or "none"
            raise UserError(f"manifest {self.path} has no field '{name}'{hint}; it has: {have}")
        spec = self.fields[name]
        have_shape = list(spec.get("shape", []))
        if shape is not None:
            ok = len(have_shape) == len(shape) and all(w is None or w == h for w, h in zip(shape, have_shape))
            if not ok:
                want = [("*" if w is None else w) for w in shape]
                raise UserError(f"manifest field '{name}' has shape {have_shape}, model expects {want}{hint}")
        if dtype is not None and spec.get("dtype") != dtype:
            raise UserError(f"manifest field '{name}' has dtype {spec.get('dtype')}, expected {dtype}{hint}")
        return spec

    def encoder_fields(self) -> list[str]:
        """Names of the patch-token fields (one per encoder)."""
        return [k for k, v in self.fields.items() if v.get("codec") == "patch-tokens"]

    def to_json(self) -> dict[str, Any]:
        repa = {
            "schema": SCHEMA_VERSION, "kind": self.kind, "num_samples": self.num_samples,
            "classes": self.classes, "preprocess": self.preprocess, "fields": self.fields,
            "skipped": self.skipped, "created_by": self.created_by, **self.extra,
        }
        return {"wids_version": WIDS_VERSION, "name": self.name,
                "shardlist": [asdict(s) for s in self.shardlist], "repa": repa}

def safe_relpath(url: str, what: str) -> str:
    """Reject absolute paths and '..' so a shard can never leave the manifest's folder."""
    check(isinstance(url, str) and url != "", f"{what}: empty or non-string path {url!r}")
    p = PurePosixPath(url)
    check(not p.is_absolute() and not url.startswith(("/", "\\")) and ":" not in p.parts[0],
          f"{what}: absolute path {url!r} is not allowed; paths must be relative to the manifest's folder")
    check(".." not in p.parts and "\\" not in url,
          f"{what}: path {url!r} leaves the manifest's folder ('..' is not allowed)")
    return url

def manifest_path(path: str | os.PathLike) -> Path:
    """Accept a manifest file or the folder that holds it (a plain path or a storage URL)."""
    p = storage.path(path)
    return p if p.suffix == ".json" or not p.is_dir() else p / MANIFEST_NAME

def load_manifest(path: str | os.PathLike, *, kind: str | None = None, verify: bool = False,
                  check_exists: bool = True) -> Manifest:
    """Read and validate a manifest; every problem is a one-line UserError naming the culprit."""
    mpath = manifest_path(path)
    raw = read_json(mpath, "manifest")
    where = f"manifest {mpath}"
    check(isinstance(raw, dict), f"{where}: top level must be a JSON object")
    repa = raw.get("repa")
    check(isinstance(repa, dict), f"{where}: missing the 'repa' section (not a REPA shard manifest?)")
    schema = repa.get("schema")
    check(schema == SCHEMA_VERSION, f"{where}: schema version {schema!r} is not supported (expected {SCHEMA_VERSION})")
    mkind = repa.get("kind")
    check(mkind in KINDS, f"{where}: 'repa.kind' is {mkind!r}, expected one of {list(KINDS)}")
    if kind is not None:
        check(mkind == kind, f"{where}: is a '{mkind}' manifest, expected '{kind}'")
    for key in ("fields", "num_samples"):
        check(key in repa, f"{where}: missing 'repa.{key}'")
    fields = repa["fields"]
    check(isinstance(fields, dict) and fields, f"{where}: 'repa.fields' must be a non-empty object")
    for fname, spec in fields.items():
        check(isinstance(spec, dict) and "shape" in spec and "dtype" in spec,
              f"{where}: field '{fname}' needs 'shape' and 'dtype'")
        if spec.get("codec") in ("patch-tokens", CONTEXT_CODEC):
            field_codec(fname, spec, where)  # a token codec this reader does not know stops here
        if spec.get("codec") == CONTEXT_CODEC:
            _check_context(fname, spec, where, mpath.parent if check_exists else None)
    shardlist = raw.get("shardlist")
    check(isinstance(shardlist, list), f"{where}: 'shardlist' must be a list")
    root = mpath.parent
    urls = [s.get("url") if isinstance(s, dict) else None for s in shardlist]
    sizes = root.file_sizes([u for u in urls if isinstance(u, str)]) if check_exists else {}
    entries: list[ShardEntry] = []
    for i, s in enumerate(shardlist):
        check(isinstance(s, dict) and "url" in s, f"{where}: shardlist[{i}] has no 'url'")
        url = safe_relpath(s["url"], f"{where}: shard {i}")
        try:
            entry = ShardEntry(url=url, nsamples=int(s["nsamples"]), sha256=str(s.get("sha256", "")),
                               bytes=int(s.get("bytes", -1)))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: shard '{url}' has a bad or missing 'nsamples'") from e
        if check_exists:
            size = sizes.get(url)
            check(size is not None, f"{where}: shard '{url}' does not exist ({root / url})")
            check(entry.bytes < 0 or size == entry.bytes, f"shard '{url}' is {size} bytes on disk, manifest says "
                                                          f"{entry.bytes} (truncated or replaced?): {root / url}")
        entries.append(entry)
    total = sum(e.nsamples for e in entries)
    check(total == int(repa["num_samples"]),
          f"{where}: shards hold {total} samples but 'repa.num_samples' is {repa['num_samples']}")
    known = {"schema", "kind", "num_samples", "classes", "preprocess", "fields", "skipped", "created_by"}
    m = Manifest(root=root, name=str(raw.get("name", root.name)), shardlist=entries, kind=mkind,
                 num_samples=int(repa["num_samples"]), fields=fields, classes=list(repa.get("classes", [])),
                 preprocess=dict(repa.get("preprocess", {})), skipped=list(repa.get("skipped", [])),
                 created_by=dict(repa.get("created_by", {})),
                 extra={k: v for k, v in repa.items() if k not in known})
    if verify:
        verify_shards(m)
    return m

def _check_context(name: str, spec: dict[str, Any], where: str, root: Path | None) -> None:
    """A text-context field: shape [null, L, D], its encoder and tokenizer recorded, the empty caption's context
    a file beside the manifest of shape [L, D] (present, of the recorded size, when `root` is given)."""
    shape, empty = list(spec["shape"]), spec.get("empty")
    check(len(shape) == 3 and shape[0] is None and all(isinstance(v, int) and v > 0 for v in shape[1:]),
          f"{where}: context field '{name}' must have shape [null, L, D] (K captions per sample), got {shape}")
    for key in ("text_encoder", "tokenizer"):
        check(isinstance(spec.get(key), dict), f"{where}: context field '{name}' does not record its '{key}'")
    check(isinstance(empty, dict) and list(empty.get("shape", [])) == shape[1:] and empty.get("dtype") == "float32",
          f"{where}: context field '{name}' needs 'empty': the empty caption's float32 {shape[1:]} context file")
    url = safe_relpath(empty.get("file"), f"{where}: context field '{name}' empty context")
    if root is not None:
        size = root.file_sizes([url]).get(url)
        check(size == empty.get("bytes"), f"{where}: empty-caption context {root / url} is missing or not "
                                          f"{empty.get('bytes')} bytes (found {size})")


def empty_context(m: Manifest, name: str = "context") -> "np.ndarray":
    """The empty caption's context (L, D) float32 of a text-context field, read from beside the manifest."""
    from .shards import decode_npy
    spec = m.field(name)
    check(spec.get("codec") == CONTEXT_CODEC, f"manifest {m.path}: field '{name}' is not a caption context")
    p = m.root / spec["empty"]["file"]
    with as_user_error("cannot read empty-caption context", p):
        return decode_npy(p.read_bytes(), str(p))


def verify_shards(m: Manifest, progress: bool = False) -> None:
    """Check each shard's sha256 against the manifest (and the empty-caption context's); a mismatch is a UserError."""
    for fname, spec in m.fields.items():
        if spec.get("codec") == CONTEXT_CODEC:
            p = m.root / spec["empty"]["file"]
            check(p.is_file() and sha256_file(p) == spec["empty"].get("sha256"),
                  f"empty-caption context {p} (field '{fname}') is missing or fails its sha256 check")
    it: Iterable[ShardEntry] = m.shardlist
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="verify sha256", unit="shard")
    for s in it:
        p = m.root / s.url
        check(p.is_file(), f"shard '{s.url}' listed in {m.path} does not exist")
        got = sha256_file(p)
        check(got == s.sha256, f"shard '{s.url}' fails sha256 check (manifest {s.sha256[:12]}…, file {got[:12]}…)")

def write_manifest(m: Manifest) -> Path:
    """Write manifest.json atomically, last, after every shard it lists is in place."""
    for s in m.shardlist:
        safe_relpath(s.url, f"manifest {m.path}")
    atomic_write_json(m.path, m.to_json())
    return m.path
