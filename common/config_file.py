"""`--config FILE` (YAML or JSON) and the layering every command uses: flags > file > preset > defaults.

A file's keys are our setting names (`enc_depth` or `enc-depth`), any of the command's flags spelt without
dashes, or REPA's names (`enc_type`, `max_train_steps`). Keys that name a flag are parsed by that flag, so a
file value means exactly what the same text on the command line means. A run's own `config.json` can be fed
back: its `train` section is used.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from .errors import UserError

_UNSET = object()


def explicit_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """Parse argv and return only the settings given on the command line (not argparse's defaults)."""
    ns = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions
                               if a.dest not in (argparse.SUPPRESS, "help")})
    parser.parse_args(list(argv), namespace=ns)  # argparse fills a default only where the namespace has none
    # An optional positional (nargs '?') that was left out still gets its default written: that is not a setting.
    absent = {a.dest for a in parser._actions if not a.option_strings and a.nargs in ("?", "*")
              and getattr(ns, a.dest, _UNSET) == a.default}
    return {k: v for k, v in vars(ns).items() if v is not _UNSET and k not in absent}


def read_config(path: str, section: str | None = None) -> dict[str, Any]:
    """A YAML or JSON mapping; a run's config.json gives its `section` (e.g. 'train')."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config: file not found: {path}")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml  # YAML is a superset of JSON: .yaml, .yml and anything else
            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - json/yaml syntax errors: one line naming the file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--config {path}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {msg}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    if section and isinstance(data.get(section), dict):
        data = data[section]
    return data


def _flag_text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def file_values(parser: argparse.ArgumentParser, path: str, fields: Collection[str],
                section: str | None = None) -> dict[str, Any]:
    """The settings of a config file: {setting name: value}, each checked by the flag that owns it."""
    index = {opt: act for act in parser._actions for opt in act.option_strings}
    out: dict[str, Any] = {}
    for key, raw in read_config(path, section).items():
        k = str(key).strip()
        dest = k.lstrip("-").replace("-", "_")
        flag = "--" + k.lstrip("-").replace("_", "-")
        act = index.get(k if k.startswith("--") else flag) or index.get("--" + k.lstrip("-"))
        if act is None and dest in fields:  # a setting with no flag (e.g. betas): taken as written
            out[dest] = raw
            continue
        if act is None or act.dest == "config":
            raise UserError(f"--config {path}: unknown setting '{k}' (use this command's flag names, e.g. "
                            f"{', '.join(sorted(index)[:3])}, or the names in config.json)")
        if raw is None:
            continue
        ns = argparse.Namespace()
        if act.nargs == 0:  # a switch: true turns it on; false leaves the default (or a preset's value) off
            if raw is True or str(raw).lower() in ("true", "1", "yes", "on"):
                act(parser, ns, [], k)
            elif isinstance(act, argparse._StoreTrueAction):
                ns = argparse.Namespace(**{act.dest: False})
        else:
            try:
                act(parser, ns, parser._get_values(act, [_flag_text(raw)]), k)
            except argparse.ArgumentError as e:
                raise UserError(f"--config {path}: '{k}': {e.message}") from None
        out.update({d: v for d, v in vars(ns).items() if d != argparse.SUPPRESS})
    return out


def layered(parser: argparse.ArgumentParser, argv: Sequence[str], fields: Collection[str],
            presets: Mapping[str, Mapping[str, Any]], section: str | None = None) -> dict[str, Any]:
    """Settings from defaults < preset < --config file < flags; `preset` may come from the file or a flag."""
    cli = explicit_args(parser, argv)
    path = cli.pop("config", None)
    file = file_values(parser, path, fields, section) if path else {}
    values: dict[str, Any] = {}
    preset = cli.get("preset") or file.get("preset")
    if preset:
        if preset not in presets:
            raise UserError(f"unknown preset '{preset}' (--preset); choose one of: {', '.join(sorted(presets))}")
        values.update(presets[preset])
        values["preset"] = preset
    values.update(file)
    values.update(cli)
    return values


def add_config_flag(group: argparse._ActionsContainer, preset: bool = True) -> None:
    group.add_argument("--config", metavar="FILE", help="settings from a YAML or JSON file (a run's config.json "
                       "works); flags override the file, the file overrides "
                       + ("--preset and the defaults" if preset else "the defaults"))


def add_run_flags(group: argparse._ActionsContainer) -> None:
    """`--config FILE` and `--dry-run` for a command without presets: every command has both (docs/cli.md)."""
    add_config_flag(group, preset=False)
    group.add_argument("--dry-run", action="store_true", help="print the resolved settings as JSON and exit")


def config_values(parser: argparse.ArgumentParser, argv: Sequence[str], cls: type,
                  presets: Mapping[str, Mapping[str, Any]] | None = None, section: str | None = None,
                  extra: Collection[str] = ()) -> tuple[dict[str, Any], bool]:
    """The settings for dataclass `cls` (defaults < preset < file < flags) and whether --dry-run was given."""
    names = {f.name for f in fields(cls)} | set(extra)
    values = layered(parser, argv, names, presets or {}, section)
    return values, bool(values.pop("dry_run", False))


__all__ = ["add_config_flag", "add_run_flags", "config_values", "explicit_args", "file_values", "layered",
           "read_config"]
