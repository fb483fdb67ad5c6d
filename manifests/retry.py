"""The one retry policy for object-store calls (DESIGN §9 "Faults and concurrency"): reads, writes, listings and
ranged reads all go through `call()`.

Transient (retried with bounded exponential backoff and full jitter): throttling (SlowDown, 503), 500
InternalError, request timeouts, dropped or reset connections. Permanent (one line at once): 403/404, a missing
bucket, a bad endpoint (connection refused), anything else. Each retry is logged on the `repa.storage` logger; the
final failure is one UserError naming the URL.

Settings (environment, read at each call so a test or a job can change them):
  REPA_STORAGE_RETRIES      attempts per operation (default 8)
  REPA_STORAGE_BACKOFF      first backoff ceiling in seconds (default 0.2), doubled per attempt
  REPA_STORAGE_BACKOFF_MAX  largest backoff ceiling in seconds (default 10)
"""
from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from common.errors import UserError

T = TypeVar("T")
log = logging.getLogger("repa.storage")
_TRANSIENT_ERRNO = {errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ETIMEDOUT, errno.ECONNRESET,
                    errno.ECONNABORTED, errno.EPIPE, errno.EAGAIN}  # s3fs: 503/SlowDown -> EBUSY, 500 -> EREMOTEIO
_TRANSIENT_NAMES = ("Timeout", "ConnectionClosed", "ServerDisconnected", "ClientPayload", "ResponseStreaming",
                    "IncompleteRead", "ClientOSError", "ConnectionReset", "ProtocolError", "ResponseParser")
_TRANSIENT_TEXT = ("SlowDown", "reduce your request rate", "InternalError", "ServiceUnavailable",
                   "internal error", "RequestTimeout", "Connection reset", "Server disconnected")
_stats_lock = threading.Lock()
STATS = {"retries": 0, "gave_up": 0}  # this process's counts (tests and the reliability page read them)


@dataclass(frozen=True)
class Policy:
    attempts: int
    backoff: float
    backoff_max: float

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, backoff * 2**attempt)] (attempt 0 = the first retry)."""
        return random.uniform(0, min(self.backoff_max, self.backoff * (2 ** attempt)))


def policy() -> Policy:
    """The policy from the environment (module docstring), read now."""
    try:
        return Policy(max(1, int(os.environ.get("REPA_STORAGE_RETRIES", "8"))),
                      float(os.environ.get("REPA_STORAGE_BACKOFF", "0.2")),
                      float(os.environ.get("REPA_STORAGE_BACKOFF_MAX", "10")))
    except ValueError as e:
        raise UserError(f"bad REPA_STORAGE_* setting: {e}") from e


def reason(e: BaseException) -> str:
    """A short reason without secrets: the exception's first line (botocore never puts keys in messages)."""
    if isinstance(e, FileNotFoundError):
        return "not found (missing bucket or object)"
    if isinstance(e, PermissionError):
        return "access denied (check AWS credentials / bucket policy)"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


def transient(e: BaseException) -> bool:
    """Whether a store calls this error transient (worth a retry); what the user must fix is not."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
                      UserError, ConnectionRefusedError)):
        return False
    name = type(e).__name__
    if "EndpointConnection" in name or "NoCredentials" in name:  # a bad endpoint or setup: the user fixes it
        return False
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
        return True
    if isinstance(e, (ConnectionError, TimeoutError)) or any(w in name for w in _TRANSIENT_NAMES):
        return True
    text = str(e)
    return isinstance(e, OSError) and any(w in text for w in _TRANSIENT_TEXT)


def call(url: str, what: str, fn: Callable[[], T], retries: int | None = None) -> T:
    """Run one storage operation under the policy; the final failure is one UserError naming `url`."""
    pol = policy()
    attempts = pol.attempts if retries is None else max(1, retries)
    for attempt in range(attempts):
        try:
            return fn()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - every client error becomes one line naming the URL
            if transient(e) and attempt + 1 < attempts:
                wait = pol.delay(attempt)
                with _stats_lock:
                    STATS["retries"] += 1
                log.warning("storage: retry %d/%d of %s %s in %.2fs: %s", attempt + 1, attempts - 1, what, url,
                            wait, reason(e))
                time.sleep(wait)
                continue
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                from common.errors import free_space
                where = f" ({e.filename}: {free_space(e.filename)} free)" if e.filename else ""
                raise UserError(f"cannot {what} {url}: no space left on device{where}") from e
            tried = f" (gave up after {attempts} attempts)" if transient(e) else ""
            with _stats_lock:
                STATS["gave_up"] += int(bool(tried))
            raise UserError(f"cannot {what} {url}: {reason(e)}{tried}") from e
    raise AssertionError("unreachable")
