"""Is a received Part 10 file whole? Its element structure, checked to the last byte.

A peer that stops mid-instance (or sends a cut-short instance) leaves a file whose header reads
fine: the header reader stops long before Pixel Data. Before answering Success we walk every
element's tag and length, without decoding values: the lengths must add up to the end of the
file, sequences and items must close, native Pixel Data must be as long as its image attributes
say (Rows × Columns × Samples per Pixel × Bits Allocated / 8 × Number of Frames) and
encapsulated Pixel Data must end with its sequence delimiter. The file is mapped, not read, so
the pixel bytes we skip over are never touched.

Deflated data sets are not walked (their element stream is compressed); the header reader still
parses them.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import UID

from routing.store.header import LONG_VRS, PIXEL_DATA, SEQUENCE_END, UNDEFINED, VRS

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
NATIVE_SYNTAXES = {IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN}

ITEM, ITEM_END = 0xFFFEE000, 0xFFFEE00D
MAX_DEPTH = 64  # nested sequences; real data sets (SR content trees included) stay far below
# VRs whose values are fixed-size numbers: a length that is not a multiple is not such a value.
_FIXED_SIZE = {b"US": 2, b"SS": 2, b"UL": 4, b"SL": 4, b"FL": 4, b"AT": 4, b"FD": 8, b"SV": 8, b"UV": 8}
# Image attributes that give native Pixel Data its length: tag → index in _Walk.image.
_IMAGE_TAGS = {0x00280002: 0, 0x00280008: 1, 0x00280010: 2, 0x00280011: 3, 0x00280100: 4, 0x00280004: 5}


_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, PIXEL_DATA}
# Elements the fast loop leaves to the general step: they are counted or measured, not only skipped.
_NOTED_TAGS = frozenset(_PIXEL_TAGS | set(_IMAGE_TAGS))
_EXPLICIT_LE_HEAD = struct.Struct("<HH2sH")  # group, element, VR, 2-byte length
_IMPLICIT_LE_HEAD = struct.Struct("<HHI")  # group, element, 4-byte length
_LE_U32 = struct.Struct("<I")


class StructureError(ValueError):
    """The element structure is broken; the message says where, never a value."""


def dataset_structure_problem(path: Path) -> str | None:
    """Why `path`'s element structure is broken (cut short, lengths that do not add up), or None.

    None also for what this check leaves to the header reader: a file that is not Part 10, or a
    deflated data set.
    """
    with open(path, "rb") as fp:
        size = fp.seek(0, 2)
        if size < 132:
            return None
        with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                start = _meta_end(data)
                if start is None:
                    return None
                syntax, sop_class_uid, pos = start
                if syntax == DEFLATED:
                    return None
                walk = _Walk(data, syntax)
                try:
                    walk.run(pos)
                except StructureError:
                    explicit_le = syntax not in (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)
                    if not explicit_le:
                        raise
                    walk = _Walk(data, syntax, implicit=True)
                    if not _walks_as_implicit(walk, pos):
                        raise
                if not walk.pixel_data and (walk.image[2] is not None or _is_image_storage(sop_class_uid)):
                    # Cut short exactly between two elements: only the missing pixels tell.
                    return "an image without Pixel Data"
            except StructureError as exc:
                return str(exc)
            except struct.error:
                return "an element header runs past the end of the file"
    return None


def _meta_end(data: mmap.mmap) -> tuple[str, str, int] | None:
    """The transfer syntax, SOP Class and where the data set starts (File Meta Information: explicit VR little endian)."""
    if data[128:132] != b"DICM":
        return None
    pos, syntax, sop_class_uid, size = 132, None, "", len(data)
    while pos + 8 <= size and data[pos : pos + 2] == b"\x02\x00":
        element, vr = struct.unpack_from("<H2s", data, pos + 2)
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            value_at = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            value_at = pos + 8
        if value_at + length > size:
            raise StructureError("the File Meta Information is cut short")
        if element in (0x0002, 0x0010):
            value = bytes(data[value_at : value_at + min(length, 64)]).rstrip(b"\0 ").decode("ascii", "replace")
            if element == 0x0002:
                sop_class_uid = value
            else:
                syntax = value
        pos = value_at + length
    return None if syntax is None else (syntax, sop_class_uid, pos)


def _walks_as_implicit(walk: _Walk, pos: int) -> bool:
    """Some senders write implicit VR under an explicit VR meta header (pydicom reads them): accept those."""
    if pos + 6 > len(walk.data) or bytes(walk.data[pos + 4 : pos + 6]) in VRS:
        return False
    walk.run(pos)
    return True


def _is_image_storage(sop_class_uid: str) -> bool:
    """A storage SOP class whose IOD requires Pixel Data ("CT Image Storage", "... Image Storage - For ...")."""
    return "Image Storage" in UID(sop_class_uid).name


@dataclass
class _Frame:
    """A data set (top level or an item) or a sequence being walked."""

    kind: str  # "dataset", "sequence" or "fragments" (encapsulated Pixel Data)
    end: int | None  # where a defined length ends it; None: a delimiter does
    implicit: bool
    last_tag: int = -1


@dataclass
class _Walk:
    data: mmap.mmap
    syntax: str
    implicit: bool = False  # implicit VR whatever the syntax says (see _walks_as_implicit)
    pixel_data: bool = False  # (float, double float) Pixel Data at the top level
    # Samples per Pixel, Number of Frames, Rows, Columns, Bits Allocated, Photometric
    # Interpretation (top level), as seen.
    image: list[int | str | None] = field(default_factory=lambda: [None] * 6)

    def __post_init__(self) -> None:
        big = self.syntax == EXPLICIT_VR_BIG_ENDIAN
        self.tag_struct = struct.Struct(">HH" if big else "<HH")
        self.u16 = struct.Struct(">H" if big else "<H")
        self.u32 = struct.Struct(">I" if big else "<I")
        self.little = not big

    def run(self, pos: int) -> None:
        size = len(self.data)
        stack = [_Frame("dataset", size, implicit=self.implicit or self.syntax == IMPLICIT_VR_LITTLE_ENDIAN)]
        while stack:
            frame = stack[-1]
            if frame.end is not None and pos == frame.end:
                stack.pop()  # the top-level data set ends here only at the end of the file
                continue
            if pos + 8 > (frame.end if frame.end is not None else size):
                raise StructureError(f"cut short at byte {pos} (an element needs 8 bytes, {size - pos} left)")
            if frame.kind == "dataset" and self.little:
                pos = self.plain_elements_skip(pos, frame, size)
                if frame.end is not None and pos == frame.end:
                    continue
                if pos + 8 > (frame.end if frame.end is not None else size):
                    raise StructureError(f"cut short at byte {pos} (an element needs 8 bytes, {size - pos} left)")
            tag, vr, length, value_at = self.element(pos, frame.implicit)
            if frame.kind == "dataset":
                if tag == ITEM_END and frame.end is None:
                    self.zero_length(tag, length)
                    stack.pop()
                    pos = value_at
                    continue
                pos = self.dataset_element(stack, frame, tag, vr, length, value_at)
            else:  # a sequence, or encapsulated Pixel Data: items, and maybe a delimiter
                if tag == SEQUENCE_END and frame.end is None:
                    self.zero_length(tag, length)
                    stack.pop()
                    pos = value_at
                    continue
                if tag != ITEM:
                    raise StructureError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) where an item should be")
                if frame.kind == "fragments":
                    if length == UNDEFINED:
                        raise StructureError("a Pixel Data fragment of undefined length")
                    pos = self.skip(value_at, length, frame, size)
                    continue
                if len(stack) >= MAX_DEPTH:
                    raise StructureError(f"sequences nested deeper than {MAX_DEPTH}")
                if length == UNDEFINED:
                    stack.append(_Frame("dataset", None, frame.implicit))
                else:
                    self.within(value_at, length, frame, size)
                    stack.append(_Frame("dataset", value_at + length, frame.implicit))
                pos = value_at

    def dataset_element(self, stack: list[_Frame], frame: _Frame, tag: int, vr: bytes, length: int, at: int) -> int:
        if tag >> 16 == 0xFFFE:
            raise StructureError(f"an item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) among data elements")
        if tag <= frame.last_tag:
            raise StructureError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) out of order")
        frame.last_tag = tag
        size = len(self.data)
        top = len(stack) == 1
        if length == UNDEFINED:
            if len(stack) >= MAX_DEPTH:
                raise StructureError(f"sequences nested deeper than {MAX_DEPTH}")
            if tag == PIXEL_DATA and top:
                self.pixel_data = True
                if self.syntax in NATIVE_SYNTAXES:
                    raise StructureError("native Pixel Data of undefined length")
                stack.append(_Frame("fragments", None, frame.implicit))
            elif frame.implicit or vr == b"SQ":
                stack.append(_Frame("sequence", None, frame.implicit))
            elif vr == b"UN":  # a sequence whose VR the sender did not know: implicit VR inside
                stack.append(_Frame("sequence", None, implicit=True))
            else:
                raise StructureError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr.decode()} of undefined length")
            return at
        fixed = _FIXED_SIZE.get(vr)
        if fixed and length % fixed:
            raise StructureError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr.decode()} of length {length}")
        end = self.skip(at, length, frame, size)
        if vr == b"SQ":  # a defined-length sequence: its items are walked too
            if len(stack) >= MAX_DEPTH:
                raise StructureError(f"sequences nested deeper than {MAX_DEPTH}")
            stack.append(_Frame("sequence", end, frame.implicit))
            return at
        if top and tag in _PIXEL_TAGS:
            self.pixel_data = True
        if top and tag in _IMAGE_TAGS:
            self.image[_IMAGE_TAGS[tag]] = self.image_value(tag, at, length)
        if top and tag == PIXEL_DATA and self.syntax in NATIVE_SYNTAXES:
            self.pixel_length_check(length)
        return end

    def plain_elements_skip(self, pos: int, frame: _Frame, size: int) -> int:
        """Step over a run of plain elements of a little-endian data set; where the general step must look.

        The same checks as dataset_element, inlined for the common case (most of a header: short
        text and numbers of defined length). It stops, without judging, at anything else: a
        sequence, an undefined length, an item tag, an element out of order, an image attribute,
        Pixel Data, a VR it does not know, a value that runs past its end; the general step then
        walks or reports that element. A CT header is about 60 elements: this loop is what keeps
        the check to tens of microseconds per instance.
        """
        data, limit, last = self.data, frame.end if frame.end is not None else size, frame.last_tag
        implicit = frame.implicit
        head = _IMPLICIT_LE_HEAD if implicit else _EXPLICIT_LE_HEAD
        while pos + 8 <= limit:
            if implicit:
                group, element, length = head.unpack_from(data, pos)
                at, vr = pos + 8, b""
            else:
                group, element, vr, length = head.unpack_from(data, pos)
                if vr in LONG_VRS:
                    if vr == b"SQ" or vr == b"UN" or pos + 12 > limit:
                        break
                    (length,) = _LE_U32.unpack_from(data, pos + 8)
                    at = pos + 12
                elif vr in VRS:
                    at = pos + 8
                else:
                    break
            tag = group << 16 | element
            if tag <= last or group == 0xFFFE or length == UNDEFINED or tag in _NOTED_TAGS or at + length > limit:
                break
            fixed = _FIXED_SIZE.get(vr)
            if fixed and length % fixed:
                break
            last = tag
            pos = at + length
        frame.last_tag = last
        return pos

    def element(self, pos: int, implicit: bool) -> tuple[int, bytes, int, int]:
        group, element = self.tag_struct.unpack_from(self.data, pos)
        tag = group << 16 | element
        if implicit or group == 0xFFFE:  # item tags have no VR, even in explicit VR data sets
            return tag, b"", self.u32.unpack_from(self.data, pos + 4)[0], pos + 8
        vr = bytes(self.data[pos + 4 : pos + 6])
        if vr in LONG_VRS:
            return tag, vr, self.u32.unpack_from(self.data, pos + 8)[0], pos + 12
        if vr not in VRS:
            raise StructureError(f"({group:04X},{element:04X}) has no valid VR")
        return tag, vr, self.u16.unpack_from(self.data, pos + 6)[0], pos + 8

    def skip(self, at: int, length: int, frame: _Frame, size: int) -> int:
        self.within(at, length, frame, size)
        return at + length

    @staticmethod
    def within(at: int, length: int, frame: _Frame, size: int) -> None:
        limit = frame.end if frame.end is not None else size
        if at + length > limit:
            raise StructureError(f"a value of {length} bytes at byte {at} runs past its end ({limit})")

    @staticmethod
    def zero_length(tag: int, length: int) -> None:
        if length != 0:
            raise StructureError(f"delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X}) with length {length}")

    def image_value(self, tag: int, at: int, length: int) -> int | str | None:
        if tag in (0x00280008, 0x00280004):  # Number of Frames (IS), Photometric Interpretation (CS)
            text = bytes(self.data[at : at + min(length, 32)]).strip(b" \0")
            if tag == 0x00280004:
                return text.decode("ascii", "replace")
            return int(text) if text.isdigit() else None
        return self.u16.unpack_from(self.data, at)[0] if length >= 2 else None

    def pixel_length_check(self, length: int) -> None:
        """Shorter than the image attributes give: cut short. Longer is accepted: some vendors pad."""
        samples, frames, rows, columns, bits, photometric = self.image
        if not isinstance(rows, int) or not isinstance(columns, int) or not isinstance(bits, int):
            return  # not an image whose size we can tell (the lengths still had to add up)
        expected = rows * columns * (samples if isinstance(samples, int) and samples else 1) * bits
        expected *= frames if isinstance(frames, int) and frames else 1
        if photometric in ("YBR_FULL_422", "YBR_PARTIAL_422"):  # two chroma samples per two pixels
            expected = expected * 2 // 3
        expected = (expected + 7) // 8
        if length < expected:
            raise StructureError(f"native Pixel Data of {length} bytes where the image attributes give {expected}")
