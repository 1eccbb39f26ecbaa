"""What keeps a run safe while it trains: a lock on its directory, and signals that end
it cleanly.

``RunLock(dir)``: ``dir/.lock`` is created exclusively (O_CREAT | O_EXCL) and holds the
owner's host and pid. A second run on the directory is refused while that process is
alive; a lock left by a process that no longer exists (kill -9, a crash, a reboot) is
taken over, so a crashed run never blocks its directory for good.

``StopSignals()``: the first SIGINT or SIGTERM only sets a flag (the loop finishes its
step, checkpoints and reports); a second one acts as usual (KeyboardInterrupt / exit).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from types import FrameType

from plumb.errors import PlumbError

LOCK = ".lock"
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Exclusive use of a run directory (see the module doc)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if self.owner() is not None:
                    self.check_free()
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except OSError as e:
                raise PlumbError(
                    f"cannot lock {self.path.parent} ({os.strerror(e.errno or 0)}): "
                    "check the directory's permissions"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise PlumbError(f"cannot lock {self.path.parent}: another run keeps taking it")

    def check_free(self) -> None:
        """Raise a ``PlumbError`` when a live process holds the lock."""
        owner = self.owner()
        if owner is not None:
            raise PlumbError(
                f"{self.path.parent} is in use by plumb (pid {owner['pid']} on "
                f"{owner['host']}): wait for that run to end, or choose another --out"
            )

    def owner(self) -> dict | None:
        """The live owner of the lock, or None when it is stale (or unreadable)."""
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # half-written by a run killed while locking: stale if old enough
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return None
            return None if age > 5 else {"pid": "?", "host": "?"}
        if host != socket.gethostname():
            return owner  # another machine's process: we cannot tell, so respect it
        if not _alive(pid):
            return None
        return owner

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


class StopSignals:
    """Turn the first SIGINT/SIGTERM into a request to stop (``.requested``)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._saved: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        try:
            for sig in EXIT_CODES:
                self._saved[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay as they are
            self._saved.clear()
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        for sig, old in self._saved.items():  # a second signal acts as usual
            signal.signal(sig, old)

    def requested(self) -> bool:
        return self.received is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.received, 1)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)
        self._saved.clear()
