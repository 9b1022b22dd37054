"""Group fsync: one fsync of a path serves every thread of the process that needs it at once.

Several associations store into the same date folder at the same time, each renaming its file
into it and then needing the folder fsynced so the rename survives a power cut. An fsync makes
durable every change to the path made *before the fsync started*; a change made while an fsync
is already running may or may not be covered. So:

- a thread that needs its change durable calls `group_fsync(path)` after making the change;
- if no fsync of that path is running, it starts one (generation g) and every thread that
  called before g started is covered by g;
- if one is running (generation g, started before this thread's change, so it proves nothing
  for it), the thread waits for g to end and then for generation g+1, which some waiter starts
  at once: whoever finds no fsync running starts the next one.

Generations are numbered, and a thread returns only when the generation that started after its
call (the number it noted on entry + 1) has finished without error; if that fsync failed, the
thread gets the same OSError (a later fsync reporting success proves nothing: Linux reports a
writeback error once and may then drop the dirty pages). With N threads waiting, one fsync
costs each of them at most two fsync durations instead of N queued ones.

Per process: the state is keyed by pid and replaced in a forked child (a lock held by another
thread at fork time would never be released there), like the fsync pool in `spool`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

# Folders change daily and a process touches one or two at a time; idle groups beyond this are dropped.
GROUPS_MAX = 16
# Failed generations are kept for their waiters; failures are rare (the filesystem is failing).
FAILURES_KEPT = 64


def group_fsync(path: Path, *, data_only: bool = False) -> None:
    """Return once an fsync of `path` that started after this call has completed; raise its OSError if it failed.

    `data_only`: fdatasync (the data and the size, not the timestamps), as SQLite syncs its WAL:
    a WAL rewritten in place after a checkpoint then needs no journal commit. Pass the same
    value for a path every time."""
    _group(path).fsync_after_now(path, data_only)


class _Group:
    def __init__(self) -> None:
        self.condition = threading.Condition(threading.Lock())
        self.started = 0  # the last generation started
        self.finished = 0  # the last generation finished (they run one at a time, in order)
        self.running = False
        self.waiting = 0  # threads waiting for a generation (the tests watch it)
        self.failures: dict[int, OSError] = {}

    @property
    def idle(self) -> bool:
        return not self.running and self.finished == self.started

    def fsync_after_now(self, path: Path, data_only: bool) -> None:
        with self.condition:
            # Our change is made: the next generation to start, and no earlier one, covers it.
            needed = self.started + 1
            while self.finished < needed and self.running:
                self.waiting += 1
                try:
                    self.condition.wait()
                finally:
                    self.waiting -= 1
            if self.finished >= needed:  # another thread ran it for us
                failure = self.failures.get(needed)
                if failure is not None:
                    raise failure
                return
            # Nothing running and our generation not yet started: we run it.
            self.running = True
            self.started += 1
            generation = self.started
        failure = None
        try:
            fsync_path(path, data_only=data_only)
        except OSError as exc:
            failure = exc
        with self.condition:
            self.running = False
            self.finished = generation
            if failure is not None:
                self.failures[generation] = failure
                while len(self.failures) > FAILURES_KEPT:
                    del self.failures[min(self.failures)]
            self.condition.notify_all()
        if failure is not None:
            raise failure


def fsync_path(path: Path, *, data_only: bool = False) -> None:
    """fsync (or fdatasync) a file or folder by its path, on its own: no sharing."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if data_only and hasattr(os, "fdatasync"):  # not on macOS
            os.fdatasync(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


_groups: dict[str, _Group] = {}
_groups_pid = os.getpid()
_groups_lock = threading.Lock()


def _group(path: Path) -> _Group:
    global _groups_pid
    key = os.fspath(path)
    with _groups_lock:
        if _groups_pid != os.getpid():
            _groups.clear()
            _groups_pid = os.getpid()
        group = _groups.get(key)
        if group is None:
            if len(_groups) >= GROUPS_MAX:
                # A dropped group still serves the threads holding it: each group on its own
                # keeps the promise (an fsync that started after the call), so two for one
                # path at once is only less sharing, never less durability.
                for stale in [k for k, g in _groups.items() if g.idle]:
                    del _groups[stale]
            group = _groups[key] = _Group()
        return group


def _after_fork_in_child() -> None:
    global _groups, _groups_pid, _groups_lock
    _groups, _groups_pid, _groups_lock = {}, os.getpid(), threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
