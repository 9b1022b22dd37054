"""The durable ingest path shared by every way an instance reaches us.

C-STORE push, C-MOVE/C-GET retrieves and STOW-RS all end in `instance_store`: the caller
has the encoded Part 10 file in a temporary file under `DATA_DIR/incoming`; we check it,
fsync it, rename it to a path *we* choose, fsync its directory, commit the rows
(routing.store.records), and only then report Success. A crash at any point leaves either
nothing visible or a complete, recorded instance.

Why that order is durable, step by step (docs/deployment.md, "What Success means"):
1. The file's fsync ends before the rename: the name never points at data still in the page
   cache. (fsync, not fdatasync: on ext4 a new file's size and blocks go through the journal
   either way, and bench/store.py measured no difference; the caller's file is closed, so we
   re-open it, which costs ~10 µs.)
2. After the rename, an fsync of the folder that *started after* the rename must end before we go
   on: an fsync covers what was done before it began. Threads renaming into the same folder
   share that fsync (routing.store.group_sync); one that renamed while an fsync was running
   waits for the next.
3. The rows are committed only after that, so a committed row always names a durable file; on
   SQLite the commit's WAL fsync is shared the same way (`records.group_commit`), and we answer
   only after a WAL fsync that started after our commit (and after any row we relied on, such
   as the first copy of a duplicate) has ended.
A failed fsync at any step answers Out of Resources: the sender keeps its copy and sends again.
"""

from __future__ import annotations

import filecmp
import logging
import os
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, OperationalError
from django.utils import timezone

from routing.models import Instance
from routing.store.group_sync import fsync_path, group_fsync
from routing.store.header import instance_header_read
from routing.store.records import group_commit, instance_record, instance_restore
from routing.store.structure import dataset_structure_problem

logger = logging.getLogger(__name__)

# DIMSE status codes (PS3.4 B.2.3); STOW-RS reuses them as Failure Reason.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

# A temporary file nobody wrote to for this long is an orphan: a receive in progress writes at
# least every network timeout (or pynetdicom aborts it), and storing one takes seconds.
INCOMING_ORPHAN_SECONDS = 3600

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


@dataclass(frozen=True)
class StoreResult:
    status: int
    message: str = ""
    instance_id: int | None = None
    study_id: int | None = None
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


def incoming_dir() -> Path:
    """Where receivers write temporary files: on the same filesystem as the store, so rename is atomic."""
    path = Path(settings.DATA_DIR) / "incoming"
    path.mkdir(parents=True, exist_ok=True)
    return path


def incoming_sweep(*, older_than: float = INCOMING_ORPHAN_SECONDS) -> int:
    """Remove temporary files under `DATA_DIR/incoming` untouched for `older_than` seconds
    (receives cut off by a crash or an abort); they never became instances. Returns how many."""
    cutoff = time.time() - older_than
    removed = 0
    for path in incoming_dir().iterdir():
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:  # another process removed or stored it meanwhile
            pass
    if removed:
        logger.info("removed %d orphaned temporary file(s) from %s", removed, incoming_dir())
    return removed


def disk_space_low() -> bool:
    floor = settings.DISK_FREE_FLOOR_MB * 1024 * 1024
    return shutil.disk_usage(settings.DATA_DIR).free < floor


def instance_store(
    *,
    temp_path: Path,
    request_sop_class_uid: str,
    request_sop_instance_uid: str,
    transfer_syntax_uid: str,
    calling_ae_title: str,
    called_ae_title: str = "",
    association_id: int | None = None,
    sender_id: int | None = None,
) -> StoreResult:
    """Check, durably store and record one received Part 10 file. Always consumes `temp_path`."""
    try:
        return _store(
            temp_path=temp_path,
            request_sop_class_uid=request_sop_class_uid,
            request_sop_instance_uid=request_sop_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            calling_ae_title=calling_ae_title,
            called_ae_title=called_ae_title,
            association_id=association_id,
            sender_id=sender_id,
        )
    finally:
        # On every path that did not move the file into the store, it must not linger.
        temp_path.unlink(missing_ok=True)


def _store(*, temp_path: Path, request_sop_class_uid: str, request_sop_instance_uid: str, **kwargs) -> StoreResult:
    if disk_space_low():
        logger.warning("refusing instance: free space under %s below the floor", settings.DATA_DIR)
        return StoreResult(OUT_OF_RESOURCES, "Out of resources: free disk space is below the configured floor")

    # Flush the data to disk in another thread while this one checks and parses it; the rename
    # (and so Success) still waits for the flush. Started first: the checks take as long as a
    # flush of a small file, and a refused file's flush is wasted but harmless.
    synced = _fsync_start(temp_path)

    # The header reader stops long before Pixel Data: a cut-short instance must not be acknowledged.
    problem = dataset_structure_problem(temp_path)
    if problem:
        logger.info("refusing instance %s: %s", _safe_uid(request_sop_instance_uid), problem)
        return StoreResult(CANNOT_UNDERSTAND, f"Cannot understand: the data set is incomplete or malformed ({problem})")

    try:
        header = instance_header_read(temp_path)
    except Exception as exc:  # pydicom raises many types on malformed input; all mean "cannot understand"
        logger.info("cannot parse instance %s: %s", _safe_uid(request_sop_instance_uid), type(exc).__name__)
        return StoreResult(
            CANNOT_UNDERSTAND, f"Cannot understand: the dataset could not be parsed ({type(exc).__name__})"
        )
    if not header["SOPClassUID"] and not header["SOPInstanceUID"]:
        return StoreResult(CANNOT_UNDERSTAND, "Cannot understand: no SOP Class or Instance UID could be read")

    problem = _mismatch(header, request_sop_class_uid, request_sop_instance_uid)
    if problem:
        logger.info("refusing instance %s: %s", _safe_uid(request_sop_instance_uid), problem)
        return StoreResult(DATASET_MISMATCH, f"Dataset does not match the request: {problem}")

    relative = _final_relative_path()
    final_path = Path(settings.DATA_DIR) / relative
    try:
        synced.result()
        renamed = _durable_rename_start(temp_path, final_path)
    except OSError as exc:
        logger.error("cannot write instance %s: %s", header["SOPInstanceUID"], exc.strerror)
        return StoreResult(OUT_OF_RESOURCES, "Out of resources: the instance could not be written to disk")

    # The folder's fsync (making the rename durable) runs while the rows are written and
    # committed; Success waits for both. Should a power cut keep the rows but lose the rename, the
    # sender, never having had Success, sends again, and a row whose file is missing takes the new
    # copy (_record).
    try:
        with group_commit():
            result = _record(header, relative, final_path, **kwargs)
        renamed.result()
    except OSError as exc:
        # The rows are committed but the fsync that makes them durable failed: do not claim
        # Success. The file and rows stay; a resend is then a duplicate and answered as such.
        logger.error("cannot make the rows of instance %s durable: %s", header["SOPInstanceUID"], exc.strerror)
        return StoreResult(OUT_OF_RESOURCES, "Out of resources: the instance could not be written to disk")
    except OperationalError as exc:
        # SQLite's lock timeout, a PostgreSQL failover: transient, so say "out of resources"
        # (the sender retries later) rather than "processing failure" (many give up).
        final_path.unlink(missing_ok=True)
        logger.warning("cannot record instance %s: database busy (%s)", header["SOPInstanceUID"], exc)
        return StoreResult(OUT_OF_RESOURCES, "Out of resources: the database is busy; send the instance again later")
    return result


def _record(header: dict[str, str], relative: str, final_path: Path, **kwargs) -> StoreResult:
    try:
        instance = instance_record(header=header, relative=relative, size=final_path.stat().st_size, **kwargs)
    except OperationalError:
        raise
    except IntegrityError:
        # The SOP Instance UID is already stored (a resend, or another association just now): the
        # unique constraint tells us, which saves a query on every instance that is not a duplicate.
        existing = Instance.objects.filter(sop_instance_uid=header["SOPInstanceUID"]).first()
        if existing is not None and (existing.deleted_at is not None or not _stored_file_exists(existing)):
            # Sent again after retention removed its pixel data, or after a power cut lost the
            # rename of the first copy (it was never answered Success): keep this copy.
            instance_restore(
                existing, relative=relative, size=final_path.stat().st_size, association_id=kwargs.get("association_id")
            )
            return StoreResult(SUCCESS, "", existing.pk, existing.study_id)
        try:
            if existing is None:
                logger.exception("cannot record instance %s", header["SOPInstanceUID"])
                return StoreResult(PROCESSING_FAILURE, "Processing failure: the instance could not be recorded")
            return _duplicate(existing, final_path)
        finally:
            final_path.unlink(missing_ok=True)
    except Exception:
        final_path.unlink(missing_ok=True)
        logger.exception("cannot record instance %s", header["SOPInstanceUID"])
        return StoreResult(PROCESSING_FAILURE, "Processing failure: the instance could not be recorded")
    return StoreResult(SUCCESS, "", instance.pk, instance.study_id)


def _mismatch(header: dict[str, str], request_class: str, request_instance: str) -> str | None:
    if header["SOPClassUID"] != request_class:
        return "SOP Class UID in the dataset differs from the C-STORE request"
    if header["SOPInstanceUID"] != request_instance:
        return "SOP Instance UID in the dataset differs from the C-STORE request"
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = header[keyword]
        if not value:
            return f"{keyword} is missing"
        if len(value) > 64 or not UID_RE.match(value):
            return f"{keyword} is not a valid UID"
    return None


def _stored_file_exists(existing: Instance) -> bool:
    return (Path(settings.DATA_DIR) / existing.path).is_file()


def _duplicate(existing: Instance, temp_path: Path) -> StoreResult:
    stored = Path(settings.DATA_DIR) / existing.path
    same = stored.exists() and filecmp.cmp(stored, temp_path, shallow=False)
    if not same:
        # Keep the first copy (as Orthanc does by default) and make the conflict visible.
        existing.study.log_event(
            "duplicate_conflict",
            f"instance {existing.sop_instance_uid} received again with different content; first copy kept",
        )
    return StoreResult(SUCCESS, "duplicate", existing.pk, existing.study_id, duplicate=True)


_made_dirs: set[Path] = set()
_fsync_pool: tuple[int, ThreadPoolExecutor] | None = None
_fsync_pool_lock = threading.Lock()


def _final_relative_path() -> str:
    # Server-chosen name: a date folder and a random UUID. No peer-supplied string ever reaches the path.
    return f"instances/{timezone.now():%Y/%m/%d}/{uuid.uuid4().hex}.dcm"


def _pool() -> ThreadPoolExecutor:
    """This process's threads for fsyncs (the GIL is released while the disk works)."""
    global _fsync_pool
    with _fsync_pool_lock:
        if _fsync_pool is None or _fsync_pool[0] != os.getpid():  # a pool does not survive fork
            _fsync_pool = (os.getpid(), ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync"))
        return _fsync_pool[1]


def _fsync_start(path: Path) -> Future:
    """fsync `path` in a worker thread."""
    return _pool().submit(fsync_path, path)


def _durable_rename_start(temp_path: Path, final_path: Path) -> Future:
    """Rename the already fsynced `temp_path` into place; the Future is done once the rename is durable."""
    folder = final_path.parent
    if folder not in _made_dirs:  # rare (a new day): all of it here
        _durable_rename(temp_path, final_path)
        done: Future = Future()
        done.set_result(None)
        return done
    os.rename(temp_path, final_path)
    return _pool().submit(group_fsync, folder)


def _durable_rename(temp_path: Path, final_path: Path) -> None:
    """Rename the already fsynced `temp_path` into place and make the rename durable.

    The folder's fsync is shared with the other threads renaming into it (`group_fsync`): we
    return only after an fsync of the folder that started after our rename has completed."""
    folder = final_path.parent
    if folder not in _made_dirs:
        folder.mkdir(parents=True, exist_ok=True)
        # A new date folder is itself a directory entry that must survive a power cut.
        data_dir = Path(settings.DATA_DIR)
        parent = folder.parent
        while parent != data_dir.parent and data_dir in (parent, *parent.parents):
            group_fsync(parent)
            parent = parent.parent
        _made_dirs.add(folder)
    os.rename(temp_path, final_path)
    group_fsync(folder)  # the rename itself must survive a power cut


def _safe_uid(value: str) -> str:
    """A peer-supplied UID fit for a log line: valid UIDs verbatim, anything else marked as such."""
    return value if UID_RE.match(value or "") and len(value) <= 64 else "<invalid uid>"
