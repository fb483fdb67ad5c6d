"""User-facing errors and the CLI wrapper that turns them into one line and exit code 2."""
from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
from typing import Callable, Iterator, Sequence

EXIT_OK, EXIT_INTERNAL, EXIT_USER = 0, 1, 2


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2, no traceback."""


def check(cond: bool, msg: str) -> None:
    """Raise UserError(msg) unless cond holds."""
    if not cond:
        raise UserError(msg)


def os_error_message(err: OSError, path: str | os.PathLike | None = None) -> str:
    """One line naming the path and the reason, e.g. 'X: No space left on device (12.0 KiB free)'."""
    where = path if path is not None else (err.filename or "?")
    # The errno's own text: libraries such as h5py put many lines of detail in strerror.
    reason = os.strerror(err.errno) if err.errno else (err.strerror or str(err) or type(err).__name__)
    reason = reason.strip().splitlines()[0] if reason.strip() else type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT) and where != "?" and "://" not in str(where):
        reason += f" ({free_space(where)} free)"  # a local disk's free space (an object store has none to show)
    return f"{where}: {reason}"


@contextlib.contextmanager
def as_user_error(doing: str, path: str | os.PathLike | None = None, hint: str = "") -> Iterator[None]:
    """An OSError inside the block becomes one UserError: '{doing} {path}: {reason}{hint}', e.g.
    'cannot write /out/x.tar: No space left on device (12.0 KiB free)'. Other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        raise UserError(f"{doing} {os_error_message(e, path)}{hint}") from e


def free_space(path: str | os.PathLike) -> str:
    """Free space on the filesystem holding `path` (its nearest existing parent), e.g. '12.0 KiB'."""
    import shutil
    p = os.path.abspath(os.fspath(path))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        free = float(shutil.disk_usage(p).free)
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} B" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run main(argv); UserError -> one line + exit 2, anything else -> exit 1 (traceback with --debug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("REPA_DEBUG") == "1"
    if "--debug" in args:
        args.remove("--debug")
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "repa"
    try:
        rc = main(args)
        return int(rc or 0)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # Disk full, permission denied: user-fixable, name the path.
        if debug:
            traceback.print_exc()
        if e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.ENOENT, errno.EDQUOT, errno.EPERM):
            print(f"error: {os_error_message(e)}", file=sys.stderr)
            return EXIT_USER
        traceback.print_exc()
        return EXIT_INTERNAL
    except Exception:  # noqa: BLE001 - the last resort prints the traceback: it is our bug
        traceback.print_exc()
        print(f"{prog}: internal error (exit 1); please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL
