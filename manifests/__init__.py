"""The contract between stages: shard-manifest schema and validation, shard format, token codecs, atomic IO,
storage, the run-folder layout (`runs`) and the preprocessing both sides agree on (`preprocess`)."""
from .codecs import (CODECS, DEFAULT_CODEC, TokenCodec, decode_sample, encode_members, field_codec, get_codec,
                     scale_field, token_field)
from .io import atomic_open, atomic_write_bytes, atomic_write_json, read_json, sha256_file
from .preprocess import SD_VAE_SCALE, SD_VAE_SHIFT
from .schema import (MANIFEST_NAME, SCHEMA_VERSION, Manifest, ShardEntry,
                     load_manifest, safe_relpath, verify_shards, write_manifest)
from .shards import (ShardInfo, decode_member, decode_npy, encode_npy, index_shard, iter_shard, npy_ext,
                     read_member, sanitize_key, write_shard)

__all__ = [
    "CODECS", "DEFAULT_CODEC", "TokenCodec", "decode_sample", "encode_members", "field_codec", "get_codec",
    "scale_field", "token_field",
    "atomic_open", "atomic_write_bytes", "atomic_write_json", "read_json",
    "sha256_file", "MANIFEST_NAME", "SCHEMA_VERSION", "SD_VAE_SCALE", "SD_VAE_SHIFT", "Manifest", "ShardEntry",
    "load_manifest", "safe_relpath", "verify_shards", "write_manifest", "ShardInfo", "decode_member",
    "decode_npy", "encode_npy", "index_shard", "iter_shard", "npy_ext", "read_member", "sanitize_key",
    "write_shard",
]
