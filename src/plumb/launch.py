"""``plumb train --nproc N``: start N processes of ``python -m plumb train ...`` with the
environment ``torchrun`` gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), on this machine; ``torch.distributed`` does the rest (``plumb.dist``).

The launcher owns the run's lifetime: a SIGINT or SIGTERM it receives goes to every rank
once (each stops after the same step, rank 0 writes the checkpoint); a rank that dies
(a crash, ``kill -9``) brings the others down (they would wait in a collective) and the
launcher says so in one line, the last good checkpoint intact. Exit code: rank 0's when
every rank ended on its own, else 1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

#: Exit codes a rank ends with on its own: done, bad input, diverged, interrupted.
ORDERLY = (0, 2, 3, 130, 143)
LOST_PEERS = 4  # a rank whose collective failed because another rank is gone
GRACE_S = 10.0  # after a rank died, how long the others get before they are killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _cause(codes: list[int | None]) -> tuple[int, int] | None:
    """(rank, code) of the rank that brought the run down: one that died (killed, or
    crashed) before one that only lost its peers; None while every exit is orderly."""
    failed = [(r, c) for r, c in enumerate(codes) if c is not None and c not in ORDERLY]
    causes = [rc for rc in failed if rc[1] != LOST_PEERS]
    return (causes or failed or [None])[0]


def launch(nproc: int, argv: list[str], out: str) -> int:
    """Run ``plumb <argv>`` on ``nproc`` local ranks; ``out`` is the run directory (for
    the message when a rank dies)."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "PLUMB_LAUNCHED": "1",  # the ranks leave the one-line message to the launcher
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "plumb", *argv],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            start_new_session=True,  # a terminal's Ctrl-C reaches the launcher only
        )
        for r in range(nproc)
    ]
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    saved = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    died: tuple[int, int] | None = None
    died_at = 0.0
    try:
        while any(p.poll() is None for p in procs):
            if died is None:
                died = _cause([p.returncode for p in procs])
                died_at = time.monotonic()
            elif time.monotonic() - died_at > GRACE_S:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)
    died = _cause([p.returncode for p in procs]) or died
    if died is not None:
        rank, code = died
        print(
            f"plumb: error: rank {rank} of {nproc} {_describe(code)}, so the run stopped; the "
            f"last good checkpoint in {out} is intact: plumb train --resume {out} --nproc {nproc}",
            file=sys.stderr,
        )
        return 1
    return procs[0].returncode
