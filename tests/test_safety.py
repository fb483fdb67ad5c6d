"""No pickle from data or user files anywhere in the product code."""
import re
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
