"""Shared argparse pieces: parse errors as one-line UserErrors, value checks, and a help formatter."""
from __future__ import annotations

import argparse
from typing import Callable

from .errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit code 2 through run_cli, not a usage dump."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown where there is one and the help doesn't already say it; epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or action.required or "default" in text:
            return text
        return super()._get_help_string(action)


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
