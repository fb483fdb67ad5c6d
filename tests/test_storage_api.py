"""The one storage entry point: a folder and an S3 prefix (a real moto server) answer the same calls the same way,
so callers never ask "is this a URL?" (manifests/storage.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from common import UserError
from manifests import storage
from manifests.io import TMP_MARK, atomic_path, ensure_writable_dir, read_json, remove_tmp_files


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """The same test on a local folder and on an S3 prefix."""
    if request.param == "local":
        return storage.path(tmp_path / "root")
    return storage.path(f"{request.getfixturevalue('s3_bucket')}/root")


def test_the_same_calls_on_a_folder_and_a_prefix(root):
    ensure_writable_dir(root)
    with atomic_path(root / "a" / "x.bin") as tmp:
        Path(tmp).write_bytes(b"0123456789")
    (root / "b.txt").write_bytes(b"hello")
    x = root / "a" / "x.bin"
    assert x.is_file() and not x.is_dir() and (root / "a").is_dir() and x.stat().st_size == 10
    assert x.read_bytes() == b"0123456789" and x.read_range(3, 4) == b"3456"
    with x.open("rb") as f:
        f.seek(8)
        assert f.read() == b"89"
    assert [(str(p.relative_to(root)), n) for p, n in root.find()] == [("a/x.bin", 10), ("b.txt", 5)]
    assert root.file_sizes(["a/x.bin", "b.txt", "missing"]) == {"a/x.bin": 10, "b.txt": 5, "missing": None}
    with pytest.raises(UserError, match="ended early"):
        x.read_range(8, 4)  # a truncated tar member is an error, not short bytes, on both
    with pytest.raises(UserError, match=f"manifest not found: {root / 'nope.json'}"):
        read_json(root / "nope.json", "manifest")
    assert root.is_remote == str(root).startswith("s3://")
    assert storage.is_url(root) == root.is_remote  # the old question still answers until its callers move


def test_a_failed_write_leaves_nothing_and_leftovers_are_cleaned(root):
    target = root / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"half")
            raise RuntimeError("writer died")
    assert not target.exists()
    if not root.is_remote:  # a killed local writer leaves a tmp file; an object store shows nothing half-written
        (Path(root) / f"{TMP_MARK}out.bin.123.abcd").write_bytes(b"half")
        assert remove_tmp_files(root) == 1
    assert remove_tmp_files(root) == 0 and [p for p, _ in root.find()] == []


def test_mirror_down_and_up(root, tmp_path, monkeypatch):
    """A prefix is mirrored into the local cache (and reused); a folder is its own mirror. mirror_up copies only
    what the destination lacks."""
    monkeypatch.setenv("REPA_REMOTE_CACHE", str(tmp_path / "cache"))
    ensure_writable_dir(root)
    for name, data in (("c/1.h5", b"one"), ("c/2.h5", b"two"), ("c/skip.txt", b"no")):
        with atomic_path(root / name) as tmp:
            Path(tmp).write_bytes(data)
    local = (root / "c").mirror(lambda listing: [k for k in sorted(listing) if k.endswith(".h5")])
    assert sorted(p.name for p in Path(local).iterdir() if p.is_file()) == (
        ["1.h5", "2.h5"] if root.is_remote else ["1.h5", "2.h5", "skip.txt"])
    assert (local == root / "c") != root.is_remote
    src = tmp_path / "new"
    src.mkdir()
    (src / "2.h5").write_bytes(b"two")
    (src / "3.h5").write_bytes(b"three")
    (src / f"{TMP_MARK}4.h5.1.ab").write_bytes(b"half")
    assert (root / "c").mirror_up(src, ".h5") == 1  # 2.h5 is there already, the tmp file is never sent
    assert (root / "c" / "3.h5").read_bytes() == b"three"


def test_paths_and_errors_name_the_culprit(tmp_path):
    assert isinstance(storage.path(str(tmp_path)), Path)  # a local path is a pathlib.Path: pathlib code keeps working
    assert storage.path(f"file://{tmp_path}") == tmp_path
    assert storage.path("~/x") == Path.home() / "x"
    assert str(storage.path("s3://b/k/")) == "s3://b/k"
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="is a folder, expected a file"):
        read_json(tmp_path / "d", "config")
    blocker = tmp_path / "f"
    blocker.write_text("x")
    with pytest.raises(UserError, match=f"output folder is not writable: {blocker}"):
        ensure_writable_dir(blocker / "sub")
