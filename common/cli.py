"""Shared argparse pieces: one-line parse errors, value checks, help formatters, renamed flags and the subcommand
dispatcher that `python -m pipeline|trainer|evaluation` all use (docs/cli.md has the convention)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from .errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit code 2 through run_cli, not a usage dump."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


class _OldNames:
    """Help shows a flag by its current name; the old spellings it still accepts follow its text compactly."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        old = getattr(action, "old_names", ())
        if not old or not action.option_strings:
            return super()._format_action_invocation(action)  # type: ignore[misc]
        shown = [s for s in action.option_strings if s not in old]
        if action.nargs == 0:
            return ", ".join(shown)
        meta = self._format_args(action, self._get_default_metavar_for_optional(action))  # type: ignore[attr-defined]
        return ", ".join(f"{s} {meta}" for s in shown)

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap
        text = " ".join(text.split())
        return textwrap.wrap(text, width, break_on_hyphens=False)  # never '--cpu-' / 'actors' across lines

    def _expand_help(self, action: argparse.Action) -> str:
        text = super()._expand_help(action)  # type: ignore[misc]
        old = getattr(action, "old_names", ())
        return f"{text} [old: {', '.join(old)}]" if old else text


class PlainHelpFormatter(_OldNames, argparse.RawDescriptionHelpFormatter):
    """Epilogs kept as written; defaults only where the help text states them."""


class HelpFormatter(_OldNames, argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown where there is one and the help doesn't already say it; epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or action.required or "default" in text:
            return text
        return super()._get_help_string(action)


def flag(group: argparse._ActionsContainer, name: str, *old: str, **kw: Any) -> argparse.Action:
    """Add `name`, also accepted under its `old` spellings (same dest, type and choices: they cannot drift)."""
    act = group.add_argument(name, *old, **kw)
    act.old_names = tuple(old)  # type: ignore[attr-defined]
    return act


def renamed_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{old spelling: current name} of a parser (docs/cli.md's table is checked against this)."""
    return {o: a.option_strings[0] for a in parser._actions for o in getattr(a, "old_names", ())}


def _checked(kind: type, ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v
    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
nonneg_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _checked(float, lambda v: v > 0, "a positive number")


def comma_list(text: str) -> list[str]:
    """'a,b' -> ['a', 'b'] (blanks dropped)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def print_config(cfg: Any) -> int:
    """--dry-run: the resolved config as JSON on stdout; exit code 0."""
    print(json.dumps(asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else cfg, indent=2, default=str))
    return 0


# ---- subcommands ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    """One subcommand: its name, a one-line help, and what runs it.

    `target` is a module path whose `main(argv)` runs the command, imported only when that command is chosen
    (so `trainer sample` never imports the training loop), or a function taking argv.
    """
    name: str
    help: str
    target: str | Callable[[list[str]], int | None]

    def run(self, argv: list[str]) -> int:
        fn = self.target if callable(self.target) else importlib.import_module(self.target).main
        return int(fn(argv) or 0)


def command_help(prog: str, description: str, commands: Sequence[Command], default: str | None = None,
                 epilog: str = "") -> str:
    """The package's --help: usage, the subcommands with one line each, and where each one's options are."""
    p = ArgumentParser(prog=prog, description=description, formatter_class=PlainHelpFormatter,
                       usage=f"{prog} {'[COMMAND]' if default else 'COMMAND'} [options]",
                       epilog=epilog or "Each command's own options: " + f"{prog} COMMAND --help.")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    for c in commands:
        sub.add_parser(c.name, help=c.help + (" (the default: the name may be left out)" if c.name == default
                                              else ""))
    return p.format_help()


def dispatch(prog: str, description: str, commands: Sequence[Command], argv: Sequence[str] | None,
             default: str | None = None, epilog: str = "") -> int:
    """Run `prog COMMAND args...`; with a `default`, argv that starts with a flag runs that command."""
    args = list(sys.argv[1:] if argv is None else argv)
    by_name = {c.name: c for c in commands}
    if not args or args[0] in ("-h", "--help"):
        print(command_help(prog, description, commands, default, epilog), end="")
        if default and args:  # the default command's own options follow: they are this command's options too
            print(f"\n{prog} {default} (also without its name):\n")
            sys.stdout.flush()
            return by_name[default].run(["--help"])
        return 0
    if args[0] in by_name:
        return by_name[args[0]].run(args[1:])
    if default and args[0].startswith("-"):
        return by_name[default].run(args)
    raise UserError(f"{prog}: unknown command {args[0]!r}; choose one of: {', '.join(by_name)} (see --help)")


__all__ = ["ArgumentParser", "Command", "HelpFormatter", "PlainHelpFormatter", "comma_list", "command_help",
           "dispatch", "flag", "nonneg_int", "positive_float", "positive_int", "print_config", "renamed_flags"]
