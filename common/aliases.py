"""Other programs' flag names (REPA's train.py, generate.py) as aliases of ours: one table per command.

An alias names the flag of ours it stands for; at parser build time it takes that flag's dest, type and
choices, so flags other modules add later keep working and an alias never drifts from its target. A flag
with no meaning here is still accepted by the parser, only to fail with a one-line reason.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass(frozen=True)
class Alias:
    """One foreign flag: what it maps to, or why it has no meaning here."""
    flag: str  # e.g. '--enc-type'
    target: str | None = None  # our flag, e.g. '--encoders'; None: no meaning here (see `why`)
    why: str = ""  # the reason it is refused, or a note on the mapping (shown in --help)
    value: Callable[[str], str] | None = None  # REPA's value text -> ours, before our flag's type parses it
    const: str | None = None  # a switch standing for `target const`, e.g. --no-tf32 -> --precision fp32
    noop: bool = False  # accepted and ignored: the behaviour here is already what it asks for
    only: str | None = None  # with noop: the one value that is a no-op here; any other is refused with `why`

    @property
    def switch(self) -> bool:
        return self.const is not None or (self.noop and self.only is None)


def world_size() -> int:
    """Ranks of this launch (torchrun sets WORLD_SIZE); 1 otherwise."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def times_world(text: str) -> str:
    """REPA's per-GPU batch -> our global batch (per-GPU x WORLD_SIZE)."""
    try:
        return str(int(text) * world_size())
    except ValueError:
        return text  # our flag's type reports it


class _AliasAction(argparse.Action):
    def __init__(self, option_strings, dest, alias: Alias, target: argparse.Action | None, prog: str, **kw):
        nargs = 0 if alias.switch else "?" if target is None and alias.only is None else None
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=nargs, **kw)
        self.alias, self.target, self.prog = alias, target, prog

    def __call__(self, parser, namespace, values, option_string=None):
        a, t = self.alias, self.target
        if a.noop:
            if a.only is not None and values != a.only:
                parser.error(f"{a.flag} {values}: only '{a.only}' is supported here: {a.why}")
            return
        if t is None:
            parser.error(f"{a.flag} has no meaning here: {a.why}")
        if isinstance(t, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            setattr(namespace, t.dest, t.const if a.const is None else a.const == "true")
            return
        text = a.const if a.const is not None else values
        if a.value is not None:
            text = a.value(text)
        try:
            v = t.type(text) if t.type is not None else text
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            parser.error(f"argument {a.flag} (= {t.option_strings[0]}): {e}")
        if t.choices is not None and v not in t.choices:
            parser.error(f"argument {a.flag} (= {t.option_strings[0]}): invalid choice {v!r} "
                         f"(choose from {', '.join(map(str, t.choices))})")
        setattr(namespace, t.dest, v)


def add_aliases(parser: argparse.ArgumentParser, table: Iterable[Alias], title: str) -> dict[str, str]:
    """Add every alias under one help heading; returns {alias flag: our dest} for config-file keys."""
    index = {opt: act for act in parser._actions for opt in act.option_strings}
    group = parser.add_argument_group(title, "Accepted so that commands copied from REPA run; ours are above.")
    dests: dict[str, str] = {}
    for a in table:
        if a.flag in index:  # the command has this flag itself (same name, same meaning)
            continue
        target = index.get(a.target) if a.target else None
        if a.target and target is None:  # the flag it maps to is not part of this command (yet)
            a = Alias(a.flag, None, f"{a.target} is not available in this command")
        if target is not None:
            dests[a.flag] = target.dest
        if a.noop:
            text = (f"'{a.only}' only: " if a.only else "accepted, no effect: ") + a.why
        elif target is None:
            text = f"refused: {a.why}"
        else:
            shown = f"{a.target} {a.const}" if a.const is not None else a.target
            text = f"= {shown}" + (f" ({a.why})" if a.why else "")
        group.add_argument(a.flag, action=_AliasAction, alias=a, target=target, prog=parser.prog,
                           help=text.replace("%", "%%"),
                           metavar=None if a.switch else target.metavar or target.dest.upper() if target else "V")
    return dests


__all__ = ["Alias", "add_aliases", "times_world", "world_size"]
