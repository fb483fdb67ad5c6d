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
        # ... and within two clicks: a README row names the command and links a docs page that documents it
        assert _pages_linked_beside(readme, f"`python -m {' '.join(cmd)}`"), f"no README row links a page for {cmd}"
        for page in _pages_linked_beside(readme, f"`python -m {' '.join(cmd)}`"):
            assert f"-m {' '.join(cmd)}" in (REPO / page).read_text(), f"{page} does not show {' '.join(cmd)}"
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


@pytest.mark.slow
def test_t2i_demo_chain_end_to_end(tmp_path):
    """`scripts/demo.py --t2i --fast`: captions -> contexts -> MMDiT -> prompt grids -> samples -> FID + CLIP."""
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(out), "--fast", "--t2i"],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    prompts = (out / "prompts.txt").read_text().splitlines()
    grid_prompts = (out / "run" / "samples" / "prompts.txt").read_text().splitlines()
    # distinct prompts only (a class-sorted set would repeat one), every class's caption among them
    assert len(prompts) == 4 and len(set(grid_prompts)) == len(grid_prompts) and set(prompts) <= set(grid_prompts)
    assert sorted(p.name for p in (out / "run" / "samples").glob("step-*.png"))[0] == "step-0000000.png"
    report = json.loads((out / "report.json").read_text())
    assert {"fid", "clip_score"} <= set(report["metrics"]) and report["comparable"] is False
    from manifests import iter_shard, load_manifest
    m = load_manifest(out / "samples", kind="samples")
    texts = [s["txt"] for url in m.shard_paths() for s in iter_shard(url)]
    assert [t.decode() if isinstance(t, bytes) else t for t in texts] == [prompts[i % 4] for i in range(8)]


def _reliability_rows(page: str) -> list[tuple[str, list[str]]]:
    """(fault, [file.py::test, ...]) per row of docs/reliability.md's table; `::test` continues the last file."""
    assert page.startswith("# Reliability\n"), "docs/reliability.md lost its title"
    section = page.split("| Fault or input |", 1)[1]
    rows = []
    for line in ("| Fault or input |" + section).splitlines():
        if not line.startswith("|"):
            break  # the table ends at its first non-row line
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("Fault or input", "---"):
            continue
        ids, current = [], None
        for ref in re.findall(r"`([^`]+)`", cells[-1]):
            assert "…" not in ref and "..." not in ref, f"abbreviated test name in docs/reliability.md: {ref}"
            fname, _, test = ref.partition("::")
            current = fname or current
            assert current and current.endswith(".py"), f"docs/reliability.md cites {ref!r} without a test file"
            ids.append(f"{current}::{test}" if test else current)
        rows.append((cells[0], ids))
    return rows


def test_reliability_table_names_real_tests(request):
    """Every row cites tests; each cited test (whole names only) is defined and collected by pytest."""
    rows = _reliability_rows((REPO / "docs" / "reliability.md").read_text())
    assert len(rows) >= 15
    sources = {p.name: p.read_text() for p in (REPO / "tests").glob("test_*.py")}
    ids = []
    for fault, cited in rows:
        assert cited, f"row without a test: {fault}"
        for nodeid in cited:
            fname, _, test = nodeid.partition("::")
            assert fname in sources, f"docs/reliability.md names {fname}, which does not exist"
            assert not test or re.search(rf"^def {test}\(", sources[fname], flags=re.M), \
                f"docs/reliability.md names {nodeid}, which is gone"
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
    docs = "\n\n".join(p.read_text() for p in _doc_pages())
    paras = [p for p in re.split(r"\n\s*\n|\n\|", docs) if "sqrtm" in p]
    figures = {f for p in paras for f in re.findall(r"(\d+(?:\.\d+)?)×", p)}
    assert len(paras) >= 2 and len(figures) == 1, figures


def _doc_pages() -> list:
    """README.md and every page under docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where links and headings live."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _links(text: str) -> list[str]:
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", _prose(text))


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', repeats numbered -1, -2 ..."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), flags=re.M):
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _pages_linked_beside(readme: str, needle: str) -> list[str]:
    """The docs pages linked on the README table rows that contain `needle`."""
    return [link.split("#")[0] for line in readme.splitlines() if line.startswith("|") and needle in line
            for link in re.findall(r"\]\((docs/[^)#]+\.md)(?:#[^)]*)?\)", line)]


def test_every_relative_link_in_the_docs_resolves():
    """Each relative link of README.md and docs/*.md names a file that exists and, with `#anchor`, a heading in it."""
    checked = 0
    for page in _doc_pages():
        for link in _links(page.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto: ...: not ours to check
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            assert target.is_file(), f"{page.relative_to(REPO)}: link {link!r} names a missing file"
            if anchor:
                assert target.suffix == ".md", f"{page.relative_to(REPO)}: anchor into a non-markdown file: {link}"
                assert anchor in _anchors(target.read_text()), \
                    f"{page.relative_to(REPO)}: link {link!r}: no such heading in {target.relative_to(REPO)}"
            checked += 1
    assert checked >= 30, checked  # the README's table alone links every page


def test_link_checker_catches_a_broken_anchor():
    """The anchor rule is GitHub's (punctuation dropped, repeats numbered), so a near-miss does not pass."""
    text = "# Memory: `--micro-batch auto`\n## Flags\n### Flags\n```\n# not a heading\n```\n"
    assert _anchors(text) == {"memory---micro-batch-auto", "flags", "flags-1"}
    assert _links("see [a](b.md#c) and `[x](y)` and ![i](d.png)") == ["b.md#c", "d.png"]


def test_readme_is_short_and_links_every_docs_page():
    """The README is an entry point (at most ~150 lines); every docs page is one click away from it."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150, len(readme.splitlines())
    linked = {link.split("#")[0] for link in _links(readme)}
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README does not link docs/{page.name}"
        assert page.read_text().startswith("# "), f"docs/{page.name} has no title"


def test_coming_from_repa_table_is_the_flag_table():
    """docs/coming-from-repa.md's mapping table is exactly trainer.repa_flags.mapping_rows(), the table --help prints."""
    from trainer.repa_flags import mapping_rows
    page = (REPO / "docs" / "coming-from-repa.md").read_text()
    table = page.split("| Command | REPA flag | Ours |\n| --- | --- | --- |\n", 1)[1].split("\n\n", 1)[0]
    assert table.splitlines() == [f"| {cmd} | `{flag}` | {ours} |" for cmd, flag, ours in mapping_rows()]
