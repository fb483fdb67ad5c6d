"""Utilities every stage may import: user errors and the CLI wrapper, the argparse toolkit, config files, flag
aliases, fault points for tests and run trackers. Nothing here knows the shard contract (that is `manifests/`)."""
from .errors import UserError, check, run_cli

__all__ = ["UserError", "check", "run_cli"]
