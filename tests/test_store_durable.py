"""The durable store under concurrency: several threads storing into one date folder share its
fsyncs and the WAL's (routing/store/group_sync.py), and still none is answered before its own
file, its own directory entry and its own rows are durable.

Real files on the real filesystem, real threads, the suite's SQLite database; os.rename,
os.fsync, os.fdatasync and each thread's connection.commit are wrapped only to record the order in which they
happened (and to make each directory fsync last a little longer,
so the threads really do overlap one another's fsyncs).
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.db import connection

from routing.models import Instance, StoreAssociation
from routing.store import group_sync, records
from routing.store.group_sync import group_fsync
from routing.store.spool import OUT_OF_RESOURCES, incoming_dir, instance_store
from tests.support.ct import make_ct_slices


@dataclass
class Recorder:
    """A global order of renames, fsyncs and answers, from every thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: itertools.count = field(default_factory=itertools.count)
    renames: dict[str, int] = field(default_factory=dict)  # destination -> when
    fsyncs: list[tuple[int, int, int, bool]] = field(default_factory=list)  # (inode, started, ended, is a folder)

    def tick(self) -> int:
        with self.lock:
            return next(self.counter)

    def install(self, monkeypatch, *, dir_fsync_delay: float = 0.0) -> None:
        real_rename = os.rename

        def rename(src, dst, **kwargs):
            real_rename(src, dst, **kwargs)
            self.renames[os.fspath(dst)] = self.tick()

        def recording(real_sync):
            def sync(fd):
                st = os.fstat(fd)
                is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
                started = self.tick()
                if is_dir:
                    time.sleep(dir_fsync_delay)
                real_sync(fd)
                with self.lock:
                    self.fsyncs.append((st.st_ino, started, next(self.counter), is_dir))

            return sync

        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "fsync", recording(os.fsync))
        monkeypatch.setattr(os, "fdatasync", recording(os.fdatasync))  # the WAL's

    def covering_fsync(self, path: Path, after: int, before: int) -> bool:
        """Did an fsync of `path` start after `after` and end before `before`?"""
        inode = path.stat().st_ino
        return any(i == inode and after < s and e < before for i, s, e, _ in self.fsyncs)


class TestConcurrentStores:
    THREADS = 4
    PER_THREAD = 6

    def test_every_instance_is_durable_and_recorded_before_its_answer(self, transactional_db, data_dir, monkeypatch):
        recorder = Recorder()
        recorder.install(monkeypatch, dir_fsync_delay=0.003)
        datasets = make_ct_slices(self.THREADS * self.PER_THREAD)
        barrier = threading.Barrier(self.THREADS)
        sent: dict[str, bytes] = {}
        answers: list[tuple[int, int, int]] = []  # (instance id, when its rows were committed, when answered)
        errors: list[BaseException] = []

        def association(index: int) -> None:
            try:
                association_id = StoreAssociation.objects.create(
                    calling_ae_title=f"MODALITY{index}", called_ae_title="PACSLENS"
                ).pk
                commits: list[int] = []
                real_commit = connection.commit

                def commit() -> None:  # this thread's connection only
                    real_commit()
                    commits.append(recorder.tick())

                connection.commit = commit  # type: ignore[method-assign]
                assert records._sqlite_wal() is not None  # the suite's SQLite: WAL, synchronous=FULL
                barrier.wait()
                for ds in datasets[index :: self.THREADS]:
                    path = incoming_dir() / f"{ds.SOPInstanceUID}.tmp"
                    ds.save_as(path, enforce_file_format=True)
                    sent[ds.SOPInstanceUID] = path.read_bytes()
                    result = instance_store(
                        temp_path=path,
                        request_sop_class_uid=ds.SOPClassUID,
                        request_sop_instance_uid=ds.SOPInstanceUID,
                        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                        calling_ae_title=f"MODALITY{index}",
                        association_id=association_id,
                    )
                    answered = recorder.tick()
                    assert result.ok and not result.duplicate, result.message
                    answers.append((result.instance_id, commits[-1], answered))
                with connection.cursor() as cursor:  # the connection is as durable as configured again
                    cursor.execute("PRAGMA synchronous")
                    assert cursor.fetchone()[0] == 2
            except BaseException as exc:  # reported below
                errors.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=association, args=(i,)) for i in range(self.THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors

        assert len(answers) == len(datasets) == Instance.objects.count()
        wal = records._sqlite_wal()
        assert wal is not None
        for instance_id, committed, answered in answers:
            instance = Instance.objects.get(pk=instance_id)
            stored = data_dir / instance.path
            assert stored.read_bytes() == sent[instance.sop_instance_uid]
            renamed = recorder.renames[str(stored)]
            # The file's data was flushed before the rename made it visible under its final name...
            assert recorder.covering_fsync(stored, -1, renamed), instance.path
            # ...and its folder by an fsync that started after that rename, before Success.
            assert recorder.covering_fsync(stored.parent, renamed, answered), instance.path
            # ...and its rows, committed after that, by an fsync of the WAL that started after the commit.
            assert renamed < committed
            assert recorder.covering_fsync(wal[0], committed, answered), instance.path
        assert {(data_dir / i.path).parent for i in Instance.objects.all()} == {stored.parent}  # one folder, shared


class TestWalFsyncFailure:
    def test_rows_not_known_durable_are_not_answered_success(self, transactional_db, data_dir, monkeypatch):
        (ds,) = make_ct_slices(1)
        wal = records._sqlite_wal()
        assert wal is not None
        real_fdatasync = os.fdatasync

        def failing(fd):
            if os.fstat(fd).st_ino == wal[0].stat().st_ino:
                raise OSError(errno.EIO, "Input/output error")
            real_fdatasync(fd)

        monkeypatch.setattr(os, "fdatasync", failing)
        assert store(ds).status == OUT_OF_RESOURCES
        with connection.cursor() as cursor:  # the connection is back at the configured level
            cursor.execute("PRAGMA synchronous")
            assert cursor.fetchone()[0] == 2
        # The sender sends it again once the disk is back: the row committed meanwhile makes it a duplicate.
        monkeypatch.setattr(os, "fdatasync", real_fdatasync)
        again = store(ds)
        assert again.ok and again.duplicate
        assert Instance.objects.count() == 1 and (data_dir / Instance.objects.get().path).exists()


class TestRenameLost:
    def test_a_row_whose_file_is_missing_takes_the_resent_copy(self, transactional_db, data_dir):
        # The folder's fsync runs beside the commit: a power cut may keep the rows and lose the
        # rename. The sender never had Success and sends again: that copy must be kept, not
        # answered as a duplicate of a file that is not there.
        (ds,) = make_ct_slices(1)
        first = store(ds)
        assert first.ok and not first.duplicate
        lost = data_dir / Instance.objects.get().path
        lost.unlink()
        again = store(ds)
        assert again.ok and not again.duplicate
        instance = Instance.objects.get()
        assert instance.pk == first.instance_id
        assert (data_dir / instance.path).is_file()
        # A true duplicate (its file is there) is still answered as one, and the file kept once.
        third = store(ds)
        assert third.ok and third.duplicate
        assert (data_dir / Instance.objects.get().path).is_file()


def store(ds):
    path = incoming_dir() / f"{ds.SOPInstanceUID}.tmp"
    ds.save_as(path, enforce_file_format=True)
    return instance_store(
        temp_path=path,
        request_sop_class_uid=ds.SOPClassUID,
        request_sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        calling_ae_title="MODALITY1",
    )


def first_fsync_held(monkeypatch, *, second_fails: bool = False) -> tuple[list[int], threading.Event, threading.Event]:
    """os.fsync recording its calls, the first one held until released (and the second failing
    with EIO, if asked): (calls, entered, release)."""
    calls: list[int] = []
    entered, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 1:
            entered.set()
            release.wait(10)
        elif len(calls) == 2 and second_fails:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls, entered, release


class TestGroupFsync:
    def test_an_fsync_already_running_does_not_cover_a_later_call(self, tmp_path, monkeypatch):
        calls, first_entered, release = first_fsync_held(monkeypatch)
        first = threading.Thread(target=group_fsync, args=(tmp_path,))
        first.start()
        assert first_entered.wait(10)
        later_done = threading.Event()
        later = threading.Thread(target=lambda: (group_fsync(tmp_path), later_done.set()))
        later.start()
        group = group_sync._group(tmp_path)
        wait_for(lambda: group.waiting == 1)
        assert not later_done.is_set()  # the running fsync began before its call: it must wait
        release.set()
        first.join(10)
        later.join(10)
        assert later_done.is_set() and len(calls) == 2

    def test_one_fsync_serves_every_thread_that_called_before_it_started(self, tmp_path, monkeypatch):
        calls, entered, gate = first_fsync_held(monkeypatch)
        threads = [threading.Thread(target=group_fsync, args=(tmp_path,)) for _ in range(5)]
        threads[0].start()
        assert entered.wait(10)
        for thread in threads[1:]:
            thread.start()
        group = group_sync._group(tmp_path)
        wait_for(lambda: group.waiting == 4)
        gate.set()
        for thread in threads:
            thread.join(10)
        assert len(calls) == 2  # the first, then one for the four that came while it ran

    def test_a_failed_fsync_fails_every_thread_it_was_to_cover(self, tmp_path, monkeypatch):
        calls, entered, gate = first_fsync_held(monkeypatch, second_fails=True)
        outcomes: list[str] = []

        def call() -> None:
            try:
                group_fsync(tmp_path)
                outcomes.append("ok")
            except OSError as exc:
                outcomes.append(errno.errorcode[exc.errno])

        first = threading.Thread(target=call)
        first.start()
        assert entered.wait(10)
        covered = [threading.Thread(target=call) for _ in range(3)]
        for thread in covered:
            thread.start()
        group = group_sync._group(tmp_path)
        wait_for(lambda: group.waiting == 3)
        gate.set()
        for thread in [first, *covered]:
            thread.join(10)
        # A later fsync that succeeds proves nothing for them: they are told.
        assert sorted(outcomes) == ["EIO", "EIO", "EIO", "ok"]
        group_fsync(tmp_path)  # the next caller gets a new fsync of its own
        assert len(calls) == 3

    def test_a_forked_child_does_not_inherit_a_lock_held_by_another_thread(self, tmp_path):
        group_fsync(tmp_path)  # the parent has state
        group_sync._groups_lock.acquire()  # as if another thread were inside it when the fork happened
        try:
            pid = os.fork()
            if pid == 0:  # the child: must not block on the parent's lock
                try:
                    group_fsync(tmp_path)
                    os._exit(0)
                except BaseException:
                    os._exit(1)
        finally:
            group_sync._groups_lock.release()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == 0
                return
            time.sleep(0.01)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child blocked on a lock inherited from the parent")


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached")
        time.sleep(0.001)
