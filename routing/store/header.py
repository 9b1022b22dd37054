"""The Part 10 header reader: the one place PacsLens walks a DICOM element stream itself.

Two readers share one walk of the data set:
- `instance_header_read`: the attributes the listener checks and records for every received
  instance (UIDs, patient, study, series), stopping after Instance Number;
- `slice_header_read`: what inference needs from a slice (pixel format, geometry), stopping at
  Pixel Data and noting where its bytes are, so the sampled slices' pixels are read with one
  numpy call.

pydicom builds a full Dataset per file: a third of the listener's CPU per instance went to
parsing these few elements, and a 300-slice series means 300 headers before inference uses a
single pixel. So the common case (little-endian data sets, plain character sets) is read here,
and anything else (big endian, deflated, odd VRs, several values, a file that is not Part 10)
makes the fast reader return None and goes through pydicom, whose result it matches
(tests/test_listener_interop.py and tests/test_volume.py compare them): the fast path can only
ever be an optimisation.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pydicom
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag, Tag

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
# Syntaxes whose data set is not explicit VR little endian (implicit is read, the others not).
_NOT_LITTLE_EXPLICIT = {IMPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}

# Explicit VRs with a 4-byte length (PS3.5 7.1.2); every other VR has a 2-byte one.
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
VRS = LONG_VRS | {
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FD",
    b"FL",
    b"IS",
    b"LO",
    b"LT",
    b"PN",
    b"SH",
    b"SL",
    b"SS",
    b"ST",
    b"TM",
    b"UI",
    b"UL",
    b"US",
}
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
ITEM_END, SEQUENCE_END = 0xFFFEE00D, 0xFFFEE0DD

# The listener's attributes, as keywords (pydicom's names) in the order the header dict has them.
HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDate",
    "StudyDescription",
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "SeriesNumber",
    "InstanceNumber",
    "SpecificCharacterSet",
]
_HEADER_TAG_NUMBERS: list[BaseTag | int] = [Tag(keyword) for keyword in HEADER_TAGS]
_LAST_HEADER_TAG = max(_HEADER_TAG_NUMBERS)
_HEADER_KEYWORD_BY_TAG = {int(tag): keyword for tag, keyword in zip(_HEADER_TAG_NUMBERS, HEADER_TAGS)}
_SPECIFIC_CHARACTER_SET = int(Tag("SpecificCharacterSet"))
_CHARSETS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}

# Inference's attributes: tag → (keyword, kind): US numbers, DS/IS decimal strings (maybe several).
SLICE_TAGS = {
    0x00180050: ("SliceThickness", "DS"),
    0x00200013: ("InstanceNumber", "IS"),
    0x00200032: ("ImagePositionPatient", "DS"),
    0x00200037: ("ImageOrientationPatient", "DS"),
    0x00280002: ("SamplesPerPixel", "US"),
    0x00280010: ("Rows", "US"),
    0x00280011: ("Columns", "US"),
    0x00280030: ("PixelSpacing", "DS"),
    0x00280100: ("BitsAllocated", "US"),
    0x00280103: ("PixelRepresentation", "US"),
    0x00281052: ("RescaleIntercept", "DS"),
    0x00281053: ("RescaleSlope", "DS"),
}

# First read sizes: one read holds the whole header of nearly every file; a larger header is
# read again, four times larger each time, up to MAX_HEADER (beyond that pydicom reads it).
_INSTANCE_FIRST_READ = 64 * 1024
_SLICE_FIRST_READ = 16 * 1024
MAX_HEADER = 4 * 1024 * 1024

_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

T = TypeVar("T")


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
    pixel_spacing: list[float] | None = None  # mm: row spacing, column spacing
    slice_thickness: float | None = None


def instance_header_read(path: Path) -> dict[str, str]:
    """The listener's attributes (HEADER_TAGS → value, "" when absent). Raises on a file pydicom cannot parse."""
    header = _read_header_fast(path)
    if header is not None:
        return header
    # Elements are in ascending tag order: stop reading after the last one we need.
    with open(path, "rb") as fp:
        ds = read_partial(fp, stop_when=_past_header, specific_tags=_HEADER_TAG_NUMBERS)
    header = {}
    for keyword in HEADER_TAGS:
        # Accessing the value forces pydicom to convert it, so corrupt values fail here.
        value = ds.get(keyword)
        header[keyword] = "" if value is None else str(value).strip()
    return header


def slice_header_read(path: Path) -> SliceHeader:
    """The slice's header: fast for uncompressed little-endian files, pydicom otherwise."""
    header = slice_header_read_fast(path)
    return header if header is not None else slice_header_read_pydicom(path)


def slice_header_read_fast(path: Path) -> SliceHeader | None:
    return _read_growing(path, _SLICE_FIRST_READ, _slice_parse)


def slice_header_read_pydicom(path: Path) -> SliceHeader:
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
        pixel_spacing=[float(v) for v in ds.PixelSpacing] if ds.get("PixelSpacing") else None,
        slice_thickness=number("SliceThickness", 0.0) or None,
    )


# --- the listener's attributes -------------------------------------------------------------------


def _read_header_fast(path: Path) -> dict[str, str] | None:
    return _read_growing(path, _INSTANCE_FIRST_READ, _instance_parse)


def _past_header(tag, vr, length) -> bool:
    return tag > _LAST_HEADER_TAG


def _instance_parse(data: bytes, whole_file: bool) -> dict[str, str] | None:
    start = _data_set_start(data)
    if start is None:
        return None
    syntax, pos = start
    if syntax in _NOT_LITTLE_EXPLICIT and syntax != IMPLICIT_VR_LITTLE_ENDIAN:
        return None
    raw, _, _, _ = _walk(
        data,
        pos,
        implicit=syntax == IMPLICIT_VR_LITTLE_ENDIAN,
        wanted=_HEADER_KEYWORD_BY_TAG,
        stop=_LAST_HEADER_TAG + 1,
        whole_file=whole_file,
    )
    try:
        charset = raw.get(_SPECIFIC_CHARACTER_SET, b"").decode("ascii").strip(" \0")
        encoding = _CHARSETS[charset]
        header = {
            keyword: raw.get(tag, b"").decode(encoding).strip(" \0").strip()
            for tag, keyword in _HEADER_KEYWORD_BY_TAG.items()
        }
    except (UnicodeDecodeError, KeyError):
        return None
    if any("\\" in value for value in header.values()):  # several values: pydicom formats those
        return None
    return header


# --- inference's attributes ----------------------------------------------------------------------


def _slice_parse(data: bytes, whole_file: bool) -> SliceHeader | None:
    start = _data_set_start(data)
    if start is None:
        return None
    syntax, pos = start
    if syntax not in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
        return None  # compressed pixels (or not little endian): pydicom's job
    raw, tag, length, value_at = _walk(
        data,
        pos,
        implicit=syntax == IMPLICIT_VR_LITTLE_ENDIAN,
        wanted=SLICE_TAGS,
        stop=PIXEL_DATA,
        whole_file=whole_file,
    )
    if tag != PIXEL_DATA or length == UNDEFINED:
        return None  # no pixels, or encapsulated ones: not for this reader
    found: dict[str, object] = {}
    for number, value in raw.items():
        keyword, kind = SLICE_TAGS[number]
        if kind == "US":
            found[keyword] = _U16.unpack_from(value)[0] if len(value) >= 2 else None
        else:
            text = value.decode("ascii").strip(" \x00")
            found[keyword] = [float(v) for v in text.split("\\") if v.strip()] if text else None

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
        pixel_offset=value_at,
        pixel_length=length,
        pixel_spacing=found.get("PixelSpacing"),  # type: ignore[arg-type]
        slice_thickness=float(first("SliceThickness", 0.0)) or None,
    )


# --- the walk ------------------------------------------------------------------------------------


class _NeedMore(Exception):
    """The buffer ended before the walk did."""


class _Unhandled(Exception):
    """Something the fast readers leave to pydicom."""


def _read_growing(path: Path, first_read: int, parse: Callable[[bytes, bool], T | None]) -> T | None:
    size = first_read
    with open(path, "rb") as fp:
        data = fp.read(size)
        while True:
            try:
                return parse(data, len(data) < size)
            except _NeedMore:
                if len(data) < size or size >= MAX_HEADER:
                    return None  # the file ended, or a header this large is not worth the fast path
                size *= 4
                fp.seek(0)
                data = fp.read(size)
            except (_Unhandled, struct.error, ValueError, UnicodeDecodeError, RecursionError):
                return None


def _data_set_start(data: bytes) -> tuple[str, int] | None:
    """The transfer syntax and where the data set starts, from the File Meta Information."""
    if data[128:132] != b"DICM":  # (a shorter buffer is a whole file: first reads are larger)
        return None
    pos, syntax = 132, None
    while data[pos : pos + 2] == b"\x02\x00":  # File Meta Information: explicit VR little endian
        if pos + 12 > len(data):
            raise _NeedMore
        element, vr = struct.unpack_from("<H2s", data, pos + 2)
        if vr in LONG_VRS:
            (length,) = _U32.unpack_from(data, pos + 8)
            value_at = pos + 12
        else:
            (length,) = _U16.unpack_from(data, pos + 6)
            value_at = pos + 8
        if value_at + length > len(data):
            raise _NeedMore
        if element == 0x0010:
            syntax = data[value_at : value_at + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos = value_at + length
    return None if syntax is None else (syntax, pos)


def _walk(
    data: bytes, pos: int, *, implicit: bool, wanted: Container[int], stop: int, whole_file: bool
) -> tuple[dict[int, bytes], int | None, int, int]:
    """The raw values of the `wanted` top-level elements before the first one tagged `stop` or more.

    Returns them with that element's tag, length and value offset; its tag is None when the data
    set ends first (in a whole file). Undefined-length sequences are skipped item by item.
    """
    found: dict[int, bytes] = {}
    size = len(data)
    while True:
        if pos + 8 > size:
            if whole_file and pos == size:
                return found, None, 0, pos
            raise _NeedMore
        group, element = _TAG.unpack_from(data, pos)
        tag = group << 16 | element
        if implicit:
            vr = b""
            (length,) = _U32.unpack_from(data, pos + 4)
            value_at = pos + 8
        else:
            vr = data[pos + 4 : pos + 6]
            if vr in LONG_VRS:
                if pos + 12 > size:
                    raise _NeedMore
                (length,) = _U32.unpack_from(data, pos + 8)
                value_at = pos + 12
            elif vr in VRS:
                (length,) = _U16.unpack_from(data, pos + 6)
                value_at = pos + 8
            else:
                raise _Unhandled  # an unknown VR, or really implicit VR whatever the meta says
        if tag >= stop:
            return found, tag, length, value_at
        if length == UNDEFINED:
            if not implicit and vr != b"SQ":
                raise _Unhandled  # e.g. UN of undefined length: implicit VR inside
            pos = _skip_undefined(data, value_at, implicit=implicit)
            continue
        if value_at + length > size:
            raise _NeedMore
        if tag in wanted:
            found[tag] = data[value_at : value_at + length]
        pos = value_at + length


def _skip_undefined(data: bytes, pos: int, *, implicit: bool) -> int:
    """Skip the undefined-length sequence (or item) whose value starts at `pos`; return the position after it."""
    while True:
        if pos + 8 > len(data):
            raise _NeedMore
        tag, vr, length, value_at = _element(data, pos, implicit=implicit)
        if tag in (SEQUENCE_END, ITEM_END):
            return value_at
        if length == UNDEFINED:
            if vr not in (b"", b"SQ"):
                raise _Unhandled
            pos = _skip_undefined(data, value_at, implicit=implicit)
        else:
            # An item with a defined length is skipped whole; any other element likewise.
            pos = value_at + length


def _element(data: bytes, pos: int, *, implicit: bool) -> tuple[int, bytes, int, int]:
    """One element's tag, VR (b"" when implicit), length and value offset."""
    group, element = _TAG.unpack_from(data, pos)
    tag = group << 16 | element
    if group == 0xFFFE or implicit:  # item tags have no VR, even in explicit VR data sets
        (length,) = _U32.unpack_from(data, pos + 4)
        return tag, b"", length, pos + 8
    vr = data[pos + 4 : pos + 6]
    if vr in LONG_VRS:
        if pos + 12 > len(data):
            raise _NeedMore
        (length,) = _U32.unpack_from(data, pos + 8)
        return tag, vr, length, pos + 12
    if vr not in VRS:
        raise _Unhandled
    (length,) = _U16.unpack_from(data, pos + 6)
    return tag, vr, length, pos + 8
