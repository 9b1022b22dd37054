"""Reading the few attributes inference needs from a slice, fast, plus where its pixels are.

A 300-slice series means 300 headers before a single pixel is used. pydicom builds a full
Dataset per file (~0.6 ms each); this reader walks the little-endian element stream of an
uncompressed Part 10 file, decodes only the attributes below and stops at Pixel Data, noting
its offset so the pixels of the sampled slices are read with one numpy call. Anything it does
not handle (compressed, big endian, deflated, odd files) returns None and the caller uses
pydicom instead, so the fast path can only ever be an optimisation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# tag → (keyword, kind): US numbers, DS/IS decimal strings (possibly multi-valued)
WANTED = {
    0x00200013: ("InstanceNumber", "IS"),
    0x00200032: ("ImagePositionPatient", "DS"),
    0x00200037: ("ImageOrientationPatient", "DS"),
    0x00280002: ("SamplesPerPixel", "US"),
    0x00280010: ("Rows", "US"),
    0x00280011: ("Columns", "US"),
    0x00280100: ("BitsAllocated", "US"),
    0x00280103: ("PixelRepresentation", "US"),
    0x00281052: ("RescaleIntercept", "DS"),
    0x00281053: ("RescaleSlope", "DS"),
}
FIRST_READ = 16 * 1024
MAX_HEADER = 4 * 1024 * 1024


class _NeedMore(Exception):
    pass


@dataclass
class SliceHeader:
    rows: int | None
    columns: int | None
    bits_allocated: int
    pixel_representation: int
    samples_per_pixel: int
    rescale_slope: float
    rescale_intercept: float
    instance_number: int | None
    position: list[float] | None
    orientation: list[float] | None
    transfer_syntax_uid: str
    # Where the uncompressed pixel bytes are, when the fast reader found them.
    pixel_offset: int | None = None
    pixel_length: int | None = None


def header_read(path: Path) -> SliceHeader:
    """The slice's header: fast for uncompressed little-endian files, pydicom otherwise."""
    header = header_read_fast(path)
    return header if header is not None else header_read_pydicom(path)


def header_read_fast(path: Path) -> SliceHeader | None:
    size = FIRST_READ
    with open(path, "rb") as fh:
        data = fh.read(size)
        while True:
            try:
                return _parse(data)
            except _NeedMore:
                if len(data) < size or size >= MAX_HEADER:
                    return None  # the file ended, or a header this large is not worth the fast path
                size *= 4
                fh.seek(0)
                data = fh.read(size)
            except (struct.error, ValueError, UnicodeDecodeError):
                return None


def header_read_pydicom(path: Path) -> SliceHeader:
    ds = pydicom.dcmread(path, stop_before_pixels=True)

    def number(keyword: str, default: float) -> float:
        value = ds.get(keyword)
        return float(value) if value not in (None, "") else default

    position = ds.get("ImagePositionPatient")
    orientation = ds.get("ImageOrientationPatient")
    instance_number = ds.get("InstanceNumber")
    return SliceHeader(
        rows=int(ds.Rows) if "Rows" in ds else None,
        columns=int(ds.Columns) if "Columns" in ds else None,
        bits_allocated=int(ds.get("BitsAllocated", 16)),
        pixel_representation=int(ds.get("PixelRepresentation", 0)),
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1)),
        rescale_slope=number("RescaleSlope", 1.0),
        rescale_intercept=number("RescaleIntercept", 0.0),
        instance_number=int(instance_number) if instance_number not in (None, "") else None,
        position=[float(v) for v in position] if position else None,
        orientation=[float(v) for v in orientation] if orientation else None,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
    )


def _parse(data: bytes) -> SliceHeader | None:
    if len(data) < 132:
        raise _NeedMore
    if data[128:132] != b"DICM":
        return None
    pos, syntax = 132, ""
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":  # File Meta: explicit VR LE
        tag, length, value_at = _element(data, pos, explicit=True)
        if tag == 0x00020010:
            syntax = data[value_at : value_at + length].rstrip(b"\x00 ").decode("ascii")
        pos = value_at + length
    if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return None
    explicit = syntax == ExplicitVRLittleEndian
    found: dict[str, object] = {}
    while True:
        if pos + 8 > len(data):
            raise _NeedMore  # and at the end of the file: no Pixel Data, pydicom reports it
        tag, length, value_at = _element(data, pos, explicit=explicit)
        if tag == PIXEL_DATA:
            if length == UNDEFINED:
                return None  # encapsulated: not for this reader
            return _header(found, syntax, value_at, length)
        if length == UNDEFINED:
            pos = _skip_undefined(data, value_at, explicit=explicit)
            continue
        if value_at + length > len(data):
            raise _NeedMore
        if tag in WANTED:
            keyword, kind = WANTED[tag]
            raw = data[value_at : value_at + length]
            if kind == "US":
                found[keyword] = struct.unpack_from("<H", raw)[0] if length >= 2 else None
            else:
                text = raw.decode("ascii").strip(" \x00")
                found[keyword] = [float(v) for v in text.split("\\") if v.strip()] if text else None
        elif tag > PIXEL_DATA:
            return None  # past where Pixel Data would be: no pixels
        pos = value_at + length


def _element(data: bytes, pos: int, *, explicit: bool) -> tuple[int, int, int]:
    group, element = struct.unpack_from("<HH", data, pos)
    tag = (group << 16) | element
    if group == 0xFFFE or not explicit:  # item tags are always implicit
        (length,) = struct.unpack_from("<I", data, pos + 4)
        return tag, length, pos + 8
    vr = data[pos + 4 : pos + 6]
    if vr in LONG_VRS:
        if pos + 12 > len(data):
            raise _NeedMore
        (length,) = struct.unpack_from("<I", data, pos + 8)
        return tag, length, pos + 12
    if not vr.isalpha():
        raise ValueError("not an explicit VR element")
    (length,) = struct.unpack_from("<H", data, pos + 6)
    return tag, length, pos + 8


def _skip_undefined(data: bytes, pos: int, *, explicit: bool) -> int:
    """Skip an undefined-length sequence (or item) starting at `pos`; return the position after it."""
    while True:
        if pos + 8 > len(data):
            raise _NeedMore
        tag, length, value_at = _element(data, pos, explicit=explicit)
        if tag in (SEQUENCE_END, ITEM_END):
            return value_at
        if length == UNDEFINED:
            pos = _skip_undefined(data, value_at, explicit=explicit)
        else:
            # An item with a defined length is skipped whole; any other element likewise.
            pos = value_at + length


def _header(found: dict, syntax: str, offset: int | None, length: int | None) -> SliceHeader:
    def first(keyword: str, default):
        values = found.get(keyword)
        if isinstance(values, list):
            return values[0] if values else default
        return default if values is None else values

    instance_number = first("InstanceNumber", None)
    return SliceHeader(
        rows=found.get("Rows"),  # type: ignore[arg-type]
        columns=found.get("Columns"),  # type: ignore[arg-type]
        bits_allocated=int(first("BitsAllocated", 16)),
        pixel_representation=int(first("PixelRepresentation", 0)),
        samples_per_pixel=int(first("SamplesPerPixel", 1)),
        rescale_slope=float(first("RescaleSlope", 1.0)),
        rescale_intercept=float(first("RescaleIntercept", 0.0)),
        instance_number=int(instance_number) if instance_number is not None else None,
        position=found.get("ImagePositionPatient"),  # type: ignore[arg-type]
        orientation=found.get("ImageOrientationPatient"),  # type: ignore[arg-type]
        transfer_syntax_uid=syntax,
        pixel_offset=offset,
        pixel_length=length,
    )
