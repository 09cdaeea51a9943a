"""One run per output folder: a lock file created exclusively, on a local disk or at a URL (gs://...).

    .gpt2_flax.lock   {"pid": 4242, "host": "t1v-n-...-w-0", "started": "2026-12-02 03:10:00",
                       "token": "<uuid4 of this run's lock>", "renewed": 1764644400.0}

- Taking it is one exclusive create: O_EXCL on a local disk; for a URL fsspec's
  `pipe_file(mode="create")`, which gcsfs (>= 2024.12) makes atomic with `ifGenerationMatch=0`
  (stores without such a precondition fall back to fsspec's check-then-write).
- A pid cannot be checked from another machine, so the holder renews a lease: a daemon thread
  rewrites `renewed` every RENEW_S seconds. A lock is stale when its holder is on this host and its
  pid has ended (killed), or when it has not been renewed for LEASE_S (its holder was killed on
  another host, or preempted with its VM). A lock with no `renewed` (written before leases) held on
  another host is never stale. A stale lock is reported and taken over; a live one refuses the run,
  unless `train.take_over_lock` says the holder is gone (tpu_scripts pass it after they stopped the
  old trainer or recreated its VM).
- Every renewal reads the lock back first. Another run's token there means this run lost the folder
  (it was taken over): the loop stops before its next checkpoint (`FolderLock.held`), because two
  writers would corrupt the checkpoints. Between that read and the rewrite another run can slip in;
  then its own next renewal finds this run's token and it stops instead: one of the two goes on.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from gpt2_flax.data.remote import filesystem, is_url
from gpt2_flax.errors import CheckpointError, spell

LOCK_FILE = ".gpt2_flax.lock"
RENEW_S = 60.0  # how often the holder rewrites `renewed`
LEASE_S = 600.0  # not renewed for this long: stale (10 renewals missed; clock skew between hosts is smaller)


def _lock_path(folder: Any) -> str:
    return f"{folder.rstrip('/')}/{LOCK_FILE}" if is_url(folder) else str(Path(folder) / LOCK_FILE)


def read_lock(folder: Any) -> dict[str, Any] | None:
    """The lock's record, None without one; an unreadable lock reads as held by an unknown run."""
    try:
        if is_url(folder):
            fs, path = filesystem(_lock_path(folder))
            text = fs.cat_file(path)
        else:
            text = Path(_lock_path(folder)).read_bytes()
        return json.loads(text)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": -1, "host": "?", "started": "?"}


def stale_reason(holder: dict[str, Any], now: float | None = None) -> str | None:
    """Why this lock's holder is surely gone, or None if it may be alive."""
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return f"was left by process {holder.get('pid')}, which has ended (killed?)"
    renewed = holder.get("renewed")
    if isinstance(renewed, (int, float)):
        age = (time.time() if now is None else now) - renewed
        if age > LEASE_S:
            return (
                f"was last renewed {age / 60:.0f} min ago by pid {holder.get('pid')} on {holder.get('host')} "
                f"(a live run renews it every {RENEW_S:.0f} s)"
            )
    return None


class FolderLock:
    """The lock of one output folder, as this run holds it (or will)."""

    def __init__(self, folder: Any) -> None:
        self.folder = folder
        self.path = _lock_path(folder)
        self.token = uuid.uuid4().hex
        self.lost: str | None = None  # set by the renewal thread when another run holds the lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        self._started = ""
        self._judged: dict[str, Any] | None = None  # the lock check() found (and judged)

    # ------------------------------------------------------------------ before anything is written
    def check(self, take_over: bool = False) -> str | None:
        """Raises if another live run holds the folder; returns a note when a lock will be taken over."""
        holder = self._judged = read_lock(self.folder)
        if holder is None:
            return None
        why = stale_reason(holder)
        if why is not None:
            return f"gpt2-flax: {self.path} {why}; taking the folder over"
        if take_over:
            return (
                f"gpt2-flax: {self.path} is held by pid {holder.get('pid')} on {holder.get('host')}; taking "
                f"the folder over ({spell('train.take_over_lock', True)}: that run must have stopped)"
            )
        renewed = holder.get("renewed")
        lease = (
            f"; its lock was renewed {time.time() - renewed:.0f} s ago and goes stale {LEASE_S / 60:.0f} min "
            "after its last renewal"
            if isinstance(renewed, (int, float))
            else ""
        )
        raise CheckpointError(
            f"{self.folder} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
            f"since {holder.get('started')}){lease}; two runs in one folder would overwrite each other's "
            f"checkpoints. Wait for it, use another output_dir, or, if that run is surely gone, pass "
            f"{spell('train.take_over_lock', True)} (or delete {self.path})"
        )

    # ------------------------------------------------------------------ holding it
    def acquire(self) -> None:
        """Takes the lock. Only the lock check() judged (stale, or to be taken over) is replaced: one
        that appeared or changed since then is another run's, taken in between."""
        just_taken = CheckpointError(f"{self.folder} was just taken by another run ({self.path})")
        current = read_lock(self.folder)
        if current is not None:
            if current != self._judged:
                raise just_taken
            self._remove()
        self._started = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            self._write(create=True)
        except FileExistsError as e:
            raise just_taken from e
        self._held = True
        self._thread = threading.Thread(target=self._renew_loop, name="gpt2-flax-lock", daemon=True)
        self._thread.start()

    def held(self) -> None:
        """Raises if the lock was taken over by another run since this run took it."""
        if self.lost is not None:
            raise CheckpointError(self.lost)

    def renew(self) -> None:
        """One renewal (the thread's): read back, then rewrite `renewed`, or record the loss."""
        holder = read_lock(self.folder)
        if holder is None or holder.get("token") != self.token:
            who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "someone (it was deleted)"
            self.lost = (
                f"{self.folder} was taken over by another run ({who}) while this run trained; it stops "
                f"before writing another checkpoint, as two runs in one folder would overwrite each "
                "other's. Its checkpoints so far are in the folder"
            )
            self._stop.set()
            return
        self._write(create=False)

    def release(self) -> None:
        """Stops renewing and removes the lock if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._held and (read_lock(self.folder) or {}).get("token") == self.token:
            self._remove()
        self._held = False

    # ------------------------------------------------------------------ the file
    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self.renew()
            except Exception:  # a network blip: the next renewal tries again (the lease is 10x longer)
                pass

    def _record(self) -> bytes:
        return json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": self._started,
                "token": self.token,
                "renewed": time.time(),
            }  # fmt: skip
        ).encode()

    def _write(self, create: bool) -> None:
        data = self._record()
        if is_url(self.folder):
            fs, path = filesystem(self.path)
            if create:
                try:
                    fs.pipe_file(path, data, mode="create")
                except TypeError:  # an fsspec store without the mode argument: check, then write
                    if fs.exists(path):
                        raise FileExistsError(self.path) from None
                    fs.pipe_file(path, data)
            else:
                fs.pipe_file(path, data)
            return
        if create:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:  # a renewal: replaced whole, so a reader never sees half a record
            tmp = f"{self.path}.{self.token}.tmp"
            Path(tmp).write_bytes(data)
            os.replace(tmp, self.path)

    def _remove(self) -> None:
        try:
            if is_url(self.folder):
                fs, path = filesystem(self.path)
                fs.rm_file(path)
            else:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True
