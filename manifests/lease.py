"""One writer per output (DESIGN §9): a lease object `OUT/.lease.json` taken before the first write, renewed by a
heartbeat thread, released at the end. A second job is refused with one line naming the holder and when the lease
expires; a lease whose holder is dead (same machine, pid gone) or whose expiry has passed may be taken over, so a
re-run after a crash proceeds.

Taking is a conditional create: O_EXCL locally, `If-None-Match: *` on S3 (where the store refuses it, a write then
a read-back of our token). A takeover deletes the stale lease and creates again, so of two jobs racing for one stale
lease only one create succeeds. Settings: REPA_LEASE_TTL seconds (default 120; the heartbeat renews every third).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from common.errors import UserError, as_user_error
from . import storage
from .objects import ObjectPath, call, pid_alive

LEASE_NAME = ".lease.json"
log = logging.getLogger("repa.lease")


def ttl() -> float:
    return float(os.environ.get("REPA_LEASE_TTL", "120"))


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass
class Lease:
    """A held lease; `release()` (or leaving the `with` block) gives it up."""
    path: storage.StoragePath
    record: dict
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def started(self) -> float:
        return self.record["started"]

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(ttl() / 3):
            try:
                cur = _read(self.path)
                if cur is None or cur.get("token") != self.record["token"]:
                    self.lost = True  # taken over (we were presumed dead): never write over the new holder
                    log.error("lease on %s lost to %s", self.path.parent, (cur or {}).get("holder", "nobody"))
                    return
                now = time.time()
                self.record.update(heartbeat=now, expires=now + ttl())
                _write(self.path, self.record)
            except UserError as e:  # a store outage: the next beat tries again before expiry
                log.warning("lease heartbeat on %s failed: %s", self.path.parent, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.lost:
            return
        self.lost = True
        try:
            cur = _read(self.path)
            if cur is not None and cur.get("token") == self.record["token"]:
                self.path.unlink(missing_ok=True)
        except (UserError, RuntimeError) as e:  # e.g. at interpreter exit, with the store client shut down
            log.warning("could not release the lease on %s (it expires by itself at %s): %s", self.path.parent,
                        _when(self.record["expires"]), e)


def _read(p) -> dict | None:
    try:
        data = p.read_bytes()
    except (FileNotFoundError, UserError):
        return None if not p.exists() else {"holder": "unreadable lease", "expires": 0}
    try:
        rec = json.loads(data)
        return rec if isinstance(rec, dict) else {"expires": 0}
    except ValueError:
        return {"holder": "unreadable lease", "expires": 0}  # stale by definition: takes over


def _write(p, rec: dict) -> None:
    """Overwrite (heartbeat): atomic locally, one PUT on a store."""
    from .io import atomic_write_bytes
    atomic_write_bytes(p, json.dumps(rec).encode())


def _create(p, rec: dict) -> bool:
    """Create the lease only if none exists; False if one does."""
    data = json.dumps(rec).encode()
    if isinstance(p, ObjectPath):
        def put() -> bool:
            try:
                p.fs.pipe_file(p.key, data, mode="create")  # If-None-Match: * (s3fs), refused if it exists
                return True
            except FileExistsError:
                return False
            except (TypeError, NotImplementedError):  # an older s3fs or a store without conditional writes
                if p.fs.exists(p.key):
                    return False
                p.fs.pipe_file(p.key, data)
                time.sleep(0.2)  # a racing writer's PUT lands within this; the read-back names the winner
                return json.loads(p.fs.cat_file(p.key)).get("token") == rec["token"]
        return call(p.url, "take the lease", put)
    try:
        with as_user_error("output folder is not writable:", p.parent):
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except UserError as e:
        if isinstance(e.__cause__, FileExistsError):
            return False
        raise
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def stale(rec: dict, now: float | None = None) -> bool:
    """Expired, or held by a dead process on this machine (or by this very process: a job run again in-process)."""
    now = time.time() if now is None else now
    if rec.get("expires", 0) < now:
        return True
    if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
        return rec["pid"] == os.getpid() or not pid_alive(rec["pid"])
    return False


def acquire(out, what: str, folder: str = "output folder") -> Lease:
    """Hold output `out` (a folder or an object-store prefix) for this job, or a one-line UserError (`folder`
    names it in errors, e.g. 'run folder (--run-dir)')."""
    from .io import ensure_writable_dir
    root = storage.path(out)
    ensure_writable_dir(root, folder)  # a folder it cannot write is named as such, before any lease logic
    p = root / LEASE_NAME
    for _ in range(5):
        now = time.time()
        rec = {"holder": f"{socket.gethostname()}:{os.getpid()}", "host": socket.gethostname(), "pid": os.getpid(),
               "what": what, "token": uuid.uuid4().hex, "started": now, "heartbeat": now, "expires": now + ttl()}
        if _create(p, rec):
            lease = Lease(p, rec)
            lease._thread = threading.Thread(target=lease._beat, name="lease-heartbeat", daemon=True)
            lease._thread.start()
            return lease
        cur = _read(p)
        if cur is None:
            continue  # released meanwhile
        if not stale(cur):
            raise UserError(f"{root} is in use by another job ({cur.get('what', '?')} on {cur.get('holder', '?')}, "
                            f"started {_when(cur.get('started', 0))}); its lease expires at "
                            f"{_when(cur['expires'])} unless renewed; wait for it or use another output")
        log.warning("taking over the stale lease of %s on %s", cur.get("holder", "?"), root)
        p.unlink(missing_ok=True)
    raise UserError(f"cannot take the lease on {root}: other jobs keep taking it; try again")


def hold(out, what: str, folder: str = "output folder") -> Lease:
    """acquire(), released by `release()` or, if the job dies of an exception first, at interpreter exit."""
    import atexit
    lease = acquire(out, what, folder)
    atexit.register(lease.release)
    return lease
