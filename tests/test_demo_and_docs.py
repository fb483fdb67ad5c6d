"""The newcomer's path: every documented command has a --help, and the demo chain runs end to end."""
import json
import math
import re
import subprocess
import sys

import pytest

from helpers import REPO, cli_help

COMMANDS = [("pipeline", "synth"), ("pipeline", "extract"), ("pipeline", "convert"), ("pipeline", "verify"),
            ("trainer", "train"), ("trainer", "sample"), ("evaluation",), ("evaluation", "align"),
            ("evaluation", "watch")]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_help_has_groups_defaults_and_an_example(cmd):
    out = cli_help(*cmd)
    assert out.startswith("usage: "), out[:200]
    assert "example" in out.lower(), f"{' '.join(cmd)} --help has no example"
    if re.search(r"^\s+--(?!help)", out, flags=re.M):  # has options: their defaults must show
        assert "default" in out.lower(), f"{' '.join(cmd)} --help shows no defaults"


def test_readme_documents_every_command_and_demo_flag():
    readme = (REPO / "README.md").read_text()
    for cmd in COMMANDS:
        assert f"python -m {' '.join(cmd)}" in readme or f"-m {' '.join(cmd)}" in readme, cmd
    assert "make demo" in readme and "make test" in readme
    assert "--vae sd-vae-ft-ema --encoders dinov2-vit-b" in readme  # how to get real pictures
    # every flag the demo passes must exist in that command's --help, so the README's chain can't rot
    demo = (REPO / "scripts" / "demo.py").read_text()
    for module, flags in _demo_invocations(demo):
        help_text = cli_help(*module)
        for flag in flags:
            assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", help_text), f"{module}: {flag} not in --help"


def _demo_invocations(src: str):
    for block in re.findall(r'\[("(?:pipeline|trainer|evaluation)".*?)\]', src, flags=re.S):
        words = re.findall(r'"([^"]+)"', block)
        module = tuple(w for w in words[:2] if not w.startswith("-") and w in
                       ("pipeline", "trainer", "evaluation", "synth", "extract", "train", "sample", "align",
                        "watch"))
        yield module, [w for w in words if w.startswith("--")]


@pytest.mark.slow
def test_demo_chain_end_to_end(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(out), "--fast"],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "meaningless" in p.stdout and "--vae sd-vae-ft-ema --encoders dinov2-vit-b" in p.stdout
    assert "(missing!)" not in p.stdout, p.stdout[-2000:]
    for rel in ["features/manifest.json", "run/loss.png", "samples/grid.png", "samples/manifest.json",
                "report.json", "align/alignment.png"]:
        assert (out / rel).is_file(), rel
    report = json.loads((out / "report.json").read_text())
    assert "not comparable" in json.dumps(report).lower()
    samples = json.loads((out / "samples" / "manifest.json").read_text())
    assert samples["repa"]["kind"] == "samples" and samples["repa"]["num_samples"] == 16
    stats = [json.loads(ln) for ln in (out / "run" / "stats.jsonl").read_text().splitlines() if ln.strip()]
    losses = [s["loss"] for s in stats if "loss" in s]
    assert len(losses) >= 5 and all(math.isfinite(v) for v in losses)


def _reliability_rows(readme: str) -> list[tuple[str, list[str]]]:
    """(fault, [file.py::test, ...]) per row of the README's Reliability table; `::test` continues the last file."""
    section = readme.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("Fault or input", "---"):
            continue
        ids, current = [], None
        for ref in re.findall(r"`([^`]+)`", cells[-1]):
            assert "…" not in ref and "..." not in ref, f"abbreviated test name in the README: {ref}"
            fname, _, test = ref.partition("::")
            current = fname or current
            assert current and current.endswith(".py"), f"README cites {ref!r} without a test file"
            ids.append(f"{current}::{test}" if test else current)
        rows.append((cells[0], ids))
    return rows


def test_reliability_table_names_real_tests(request):
    """Every row cites tests; each cited test (whole names only) is defined and collected by pytest."""
    readme = (REPO / "README.md").read_text()
    rows = _reliability_rows(readme)
    assert len(rows) >= 15
    sources = {p.name: p.read_text() for p in (REPO / "tests").glob("test_*.py")}
    ids = []
    for fault, cited in rows:
        assert cited, f"row without a test: {fault}"
        for nodeid in cited:
            fname, _, test = nodeid.partition("::")
            assert fname in sources, f"README names {fname}, which does not exist"
            assert not test or re.search(rf"^def {test}\(", sources[fname], flags=re.M), \
                f"README names {nodeid}, which is gone"
            ids.append(f"tests/{nodeid}")
    def missing(collected: set[str]) -> list[str]:
        return [i for i in ids if not any(c == i or c.startswith((f"{i}::", f"{i}[")) for c in collected)]
    if missing({item.nodeid for item in request.session.items}):  # run alone: collect the cited tests
        p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                           cwd=REPO, capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
        assert not missing(set(p.stdout.split())), f"{missing(set(p.stdout.split()))} not collected by pytest"


def test_fid_speedup_figure_is_the_same_everywhere():
    """The eigen-trace vs scipy.linalg.sqrtm speed-up is quoted once per place it appears, with one value."""
    readme = (REPO / "README.md").read_text()
    paras = [p for p in re.split(r"\n\s*\n|\n\|", readme) if "sqrtm" in p]
    figures = {f for p in paras for f in re.findall(r"(\d+(?:\.\d+)?)×", p)}
    assert len(paras) >= 2 and len(figures) == 1, figures
