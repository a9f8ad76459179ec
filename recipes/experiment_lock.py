"""One run per experiment folder: the lock that training, scoring and export hold on it.

Two processes writing one ``output_folder`` delete each other's checkpoints, interleave their logs
and score each other's models. Each entry script therefore holds an exclusive lock on the folder
for its whole life, taken before the YAML builds anything: a POSIX record lock (``fcntl.lockf``)
on ``<output_folder>/.run.lock``. The kernel releases it when the process ends, killed or not, so
a crashed or pre-empted run leaves no stale lock to clean up. A record lock, not ``flock``: it
belongs to the process, so the data loader's forked workers do not hold it on after a killed run
(a ``flock`` would be shared with them until they notice and exit). The file records who holds
it (process, host, command, start), which the refused run prints.

Under ``torchrun`` the main process holds it for the run (the other processes of that run write
nothing the main process does not coordinate). The lock is advisory: it keeps out the recipe's
own scripts, on this machine (NFS clients on other hosts only where the server supports locks).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

#: The lock file inside an experiment folder.
LOCK_FILE = ".run.lock"

#: Folders this process holds, with their open lock files (kept open: closing releases; so
#: nothing else in this process may open and close a lock file).
_HELD: dict[Path, object] = {}


class FolderInUse(SystemExit):
    """Another process holds the experiment folder (the message names it)."""


def hold_experiment_lock(folder) -> None:
    """Hold ``folder``'s lock for the rest of this process; refuse if another process holds it.

    Only the main process of a ``torchrun`` group takes it; taking it again is a no-op.
    """
    folder = Path(folder).resolve()
    # RANK, not SpeechBrain's if_main_process: the lock is taken before the process group is
    # set up, when every process would count as the main one.
    if folder in _HELD or int(os.environ.get("RANK", "0")) != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 (held open)
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        handle.seek(0)
        holder = handle.read().strip() or "a process that did not say who it is"
        handle.close()
        raise FolderInUse(
            f"error: {folder} is in use by another run: {holder}. Wait for it to end, or give "
            "this run its own --output_folder"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(holder_record()) + "\n")
    handle.flush()
    _HELD[folder] = handle


def holder_record() -> dict:
    """Who holds a lock: this process, its host, its command line and when it started."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
