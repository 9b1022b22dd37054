"""A streaming reader for `multipart/related` bodies (STOW-RS requests).

Django's parser handles multipart/form-data only. This one reads the body in chunks and writes
each part straight to a temp file, so memory stays bounded by the chunk size whatever the size
of the instances, and hands each part to the caller as soon as its closing boundary arrives.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK_SIZE = 256 * 1024
MAX_HEADER_BYTES = 16 * 1024
# Senders put nothing (or a line of text) before the first boundary; a body that shows none
# within this many bytes is not multipart, and must not be held in memory to find out.
MAX_PREAMBLE_BYTES = 64 * 1024
# Free space is checked (a statvfs call) each time this many more bytes were written.
SPACE_CHECK_BYTES = 4 * 1024 * 1024


class MultipartError(ValueError):
    """The body is not a well-formed multipart/related message (says where, never what it held)."""


class BodyTooLarge(MultipartError):
    pass


class OutOfSpace(MultipartError):
    """Free disk space fell below the floor while a part was being written."""


@dataclass
class Part:
    headers: dict[str, str]  # lower-cased names
    path: Path
    size: int

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


def iter_parts(
    stream: BinaryIO,
    *,
    boundary: str,
    directory: Path,
    max_bytes: int,
    space_low: Callable[[], bool] = lambda: False,
) -> Iterator[Part]:
    """Yield each part of the body on `stream`, its content in a file under `directory`.

    The caller owns (and must remove) each yielded file; a part that fails half-way leaves no
    file. Raises MultipartError on a malformed body, BodyTooLarge once more than `max_bytes`
    were read, OutOfSpace when `space_low()` says so while a part is written.
    """
    if not boundary.isascii() or not boundary.isprintable():
        raise MultipartError("the boundary is not printable ASCII")
    reader = _Reader(stream, max_bytes)
    delimiter = b"\r\n--" + boundary.encode("ascii")
    # Treat the body as if it started with CRLF, so the first boundary looks like all the others.
    buffer = bytearray(b"\r\n")
    found = reader.fill_until(buffer, delimiter, limit=MAX_PREAMBLE_BYTES + len(delimiter))
    if not found or buffer.find(delimiter) > MAX_PREAMBLE_BYTES:
        raise MultipartError(f"no opening boundary in the first {MAX_PREAMBLE_BYTES // 1024} KiB")
    del buffer[: buffer.find(delimiter) + len(delimiter)]
    number = 0
    while True:
        while len(buffer) < 2 and reader.more(buffer):
            pass
        if buffer.startswith(b"--"):
            return  # the close delimiter; anything after it is an epilogue to ignore
        if not reader.fill_until(buffer, b"\r\n", limit=MAX_HEADER_BYTES):
            raise MultipartError(f"body ends after boundary {number}")
        line_end = buffer.find(b"\r\n")
        del buffer[: line_end + 2]
        number += 1
        if not reader.fill_until(buffer, b"\r\n\r\n", limit=MAX_HEADER_BYTES, allow_at_start=True):
            raise MultipartError(f"part {number}: headers not terminated")
        headers = _headers(buffer, number)
        path = directory / f"stow-{uuid.uuid4().hex}.part"
        size = _body_to_file(reader, buffer, delimiter, path, number, space_low)
        yield Part(headers=headers, path=path, size=size)


class _Reader:
    def __init__(self, stream: BinaryIO, max_bytes: int) -> None:
        self.stream = stream
        self.max_bytes = max_bytes
        self.read_bytes = 0
        self.eof = False

    def more(self, buffer: bytearray) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.stream.read(CHUNK_SIZE)
        except OSError as exc:  # the client went away mid-body (Django's UnreadablePostError is one)
            raise MultipartError(f"the body could not be read ({type(exc).__name__})") from None
        if not chunk:
            self.eof = True
            return False
        self.read_bytes += len(chunk)
        if self.read_bytes > self.max_bytes:
            raise BodyTooLarge(f"request body exceeds {self.max_bytes} bytes")
        buffer += chunk
        return True

    def fill_until(
        self, buffer: bytearray, marker: bytes, *, limit: int | None = None, allow_at_start: bool = False
    ) -> bool:
        """Read until `marker` is in `buffer` (False at end of body or past `limit` bytes)."""
        start = 0
        while True:
            if marker == b"\r\n\r\n" and allow_at_start and buffer.startswith(b"\r\n"):
                return True  # a part without headers: the blank line comes first
            if buffer.find(marker, start) >= 0:
                return True
            if limit is not None and len(buffer) > limit:
                return False
            start = max(0, len(buffer) - len(marker) + 1)
            if not self.more(buffer):
                return False


def _headers(buffer: bytearray, number: int) -> dict[str, str]:
    if buffer.startswith(b"\r\n"):
        del buffer[:2]
        return {}
    end = buffer.find(b"\r\n\r\n")
    headers: dict[str, str] = {}
    for line in bytes(buffer[:end]).decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            raise MultipartError(f"part {number}: malformed header line")
        headers[name.strip().lower()] = value.strip()
    del buffer[: end + 4]
    return headers


def _body_to_file(
    reader: _Reader, buffer: bytearray, delimiter: bytes, path: Path, number: int, space_low: Callable[[], bool]
) -> int:
    try:
        with path.open("wb") as fh:
            return _copy_part(reader, buffer, delimiter, fh, number, space_low)
    except BaseException:
        # Too large, out of space, truncated, client gone: a half-written part must not linger.
        path.unlink(missing_ok=True)
        raise


def _copy_part(
    reader: _Reader, buffer: bytearray, delimiter: bytes, fh: BinaryIO, number: int, space_low: Callable[[], bool]
) -> int:
    size = 0
    checked_at = 0
    while True:
        index = buffer.find(delimiter)
        if index >= 0:
            fh.write(buffer[:index])
            size += index
            del buffer[: index + len(delimiter)]
            return size
        # Keep a tail that could be the start of a delimiter split across two reads.
        keep = len(delimiter) - 1
        if len(buffer) > keep:
            fh.write(buffer[: len(buffer) - keep])
            size += len(buffer) - keep
            del buffer[: len(buffer) - keep]
        if size - checked_at >= SPACE_CHECK_BYTES:
            checked_at = size
            if space_low():
                raise OutOfSpace(f"part {number}: free disk space fell below the floor")
        if not reader.more(buffer):
            raise MultipartError(f"part {number}: body ends before its closing boundary")
