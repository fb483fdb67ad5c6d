"""The import rule (docs/architecture.md), read from the source: stages meet only through `manifests/` (the contract),
`common/` (utilities) and two public registries; and no module imports itself back through a cycle.

Every import counts, lazy ones inside functions included: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "manifests", "pipeline", "trainer", "evaluation")
# What a stage may take from another stage: its public model registries and loaders, nothing else.
PUBLIC = {"pipeline.encoders": "the VAE and encoder loaders", "trainer.models": "the model-family registry and loader"}
ALLOWED = {  # package -> the packages it may import (besides itself and PUBLIC)
    "common": {"common", "manifests"},
    "manifests": {"manifests", "common"},
    "pipeline": {"pipeline", "common", "manifests"},
    "trainer": {"trainer", "common", "manifests"},
    "evaluation": {"evaluation", "common", "manifests"},
}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file; `from X import name` counts X.name when it is a module."""
    mod = _module_name(path, root)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if _exists(sub, root) else base))
    return [(ln, m) for ln, m in out if m.split(".")[0] in PACKAGES]


def _exists(mod: str, root: Path = ROOT) -> bool:
    p = root.joinpath(*mod.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _sources(root: Path = ROOT) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def _violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in _sources(root):
        top = _module_name(path, root).split(".")[0]
        for line, target in _imports(path, root):
            if target.split(".")[0] in ALLOWED[top] or any(target == p or target.startswith(p + ".")
                                                          for p in PUBLIC if p.split(".")[0] != top):
                continue
            bad.append(f"{path.relative_to(root)}:{line} imports {target}")
    return bad


def test_stages_meet_only_through_the_contract_common_and_public_registries():
    bad = _violations()
    assert not bad, "imports across stages outside manifests/, common/ and " + ", ".join(PUBLIC) + ":\n" + "\n".join(bad)


def test_public_registries_are_what_the_other_stages_use():
    """The exceptions stay narrow: a public name another stage imports must be one of PUBLIC's modules or below."""
    for p in PUBLIC:
        assert _exists(p), f"{p} is named public but does not exist"


def test_no_import_cycles():
    graph = {_module_name(p): {m for _, m in _imports(p) if m != _module_name(p)} for p in _sources()}
    # A module importing its own package's __init__ is not a cycle the rule cares about; drop package edges.
    pkgs = {m for m in graph if (ROOT.joinpath(*m.split(".")) / "__init__.py").is_file()}
    edges = {m: {t for t in ts if t in graph and t not in pkgs} for m, ts in graph.items() if m not in pkgs}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_rule_catches_a_planted_violation(tmp_path):
    """The checker itself can fail: in a copy of the tree, a planted evaluation -> pipeline internal import is
    reported, and the public loader is not."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "transforms.py").write_text("")
    (tmp_path / "pipeline" / "encoders.py").write_text("")
    (tmp_path / "evaluation" / "bad.py").write_text("import os\nfrom pipeline.transforms import decode_crop\n")
    (tmp_path / "evaluation" / "good.py").write_text("from pipeline.encoders import load_vae\n")
    assert _violations(tmp_path) == ["evaluation/bad.py:2 imports pipeline.transforms"]
