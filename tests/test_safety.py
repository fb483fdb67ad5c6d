"""No pickle from data or user files anywhere in the product code."""
import re
from unittest import mock
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["manifests", "pipeline", "trainer", "evaluation"]


def _sources():
    for pkg in PACKAGES:
        yield from (REPO / pkg).rglob("*.py")


def test_no_unsafe_deserialisation():
    bad = re.compile(r"allow_pickle\s*=\s*True|weights_only\s*=\s*False|pickle\.loads?\(|Unpickler\(|"
                     r"import dill|torch\.load\((?![^)]*weights_only\s*=\s*True)")
    hits = []
    for p in _sources():
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if bad.search(line) and "# safe:" not in line:
                hits.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "unsafe deserialisation:\n" + "\n".join(hits)


def test_every_np_load_refuses_pickle():
    hits = []
    for p in _sources():
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"\bnp\.load\(", line) and "allow_pickle=False" not in line:
                hits.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "np.load without allow_pickle=False:\n" + "\n".join(hits)


# Third-party loaders that unpickle user files without weights_only on the torch versions pyproject allows
# (open_clip's load_openai_model falls back to a bare torch.load); the product goes around them.
UNSAFE_THIRD_PARTY = re.compile(r"load_openai_model\(|torch\.hub\.load_state_dict_from_url\((?![^)]*weights_only)")


def test_no_unsafe_third_party_loader():
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in _sources()
            for i, line in enumerate(p.read_text().splitlines(), 1) if UNSAFE_THIRD_PARTY.search(line)]
    assert not hits, "third-party loader that unpickles:\n" + "\n".join(hits)


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_clip_name_path_never_runs_a_pickle(tmp_path):
    """`tiny-clip=PATH` (the OpenAI CLIP layout) with a pickle payload in place of a state dict: one line, and the
    payload never ran. (Planted bug this catches: going through open_clip.load_openai_model, whose torch.load
    fallback has no weights_only and runs the payload on torch < 2.6.)"""
    import pickle

    import pytest
    import torch

    from common import UserError
    from pipeline.encoders import load_encoder
    marker = tmp_path / "pwned"
    bad = tmp_path / "ViT-L-14.pt"
    torch.save({"state_dict": _Payload(marker)}, bad, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    calls, real_load = [], torch.load

    def recording_load(*a, **kw):  # torch >= 2.6 defaults to weights_only=True; the product must not rely on it
        calls.append(kw.get("weights_only"))
        return real_load(*a, **kw)
    with mock.patch.object(torch, "load", recording_load), pytest.raises(UserError, match="ViT-L-14.pt"):
        load_encoder(f"tiny-clip={bad}")
    assert not marker.exists()
    assert calls and all(w is True for w in calls), calls
