"""The summary image (Secondary Capture) and key object selection (KOS) sent beside the SR.

Many PACS viewers list an SR without displaying it; a Secondary Capture of the key slice with
the finding outlined, the score, the model and "AI triage — not for diagnosis" is what those
viewers show. A KOS flags the key images for viewers that present key objects.

Both go into the source study, each in a series of its own, with UIDs derived from the result
identity like the SR's (results/deliver/payload.py), so a re-send is the same object and the
PACS keeps one copy; their dates come from the result, not the clock. The image is rendered
with Pillow (a highdicom dependency already) from the key slice's pixels; the outline is the
region `results.key_region.region_mask` finds inside the box the inference step recorded.
No patient data is drawn into the image.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from results.deliver.payload import (
    KOS_SERIES,
    KOS_SOP_INSTANCE,
    SUMMARY_SERIES,
    SUMMARY_SOP_INSTANCE,
    ResultPayload,
)
from results.key_region import largest_component, outline, region_mask

MANUFACTURER = "PacsLens"
DISCLAIMER = "AI triage — not for diagnosis"
# In DICOM text attributes: the source study's character set may be plain Latin-1 or ASCII.
DISCLAIMER_ASCII = "AI triage - not for diagnosis"
SUMMARY_SERIES_NUMBER = 9902
SUMMARY_SERIES_DESCRIPTION = "PacsLens AI summary (not for diagnosis)"
KOS_SERIES_NUMBER = 9903
KOS_SERIES_DESCRIPTION = "PacsLens AI key images"
IMAGE_SIZE = 512  # the key slice is shown at 512 x 512, whatever its matrix
TEXT_BAND = 112  # pixels of text under the image
# Brain window (centre, width) when the slice suggests none.
DEFAULT_WINDOW = (40.0, 80.0)
OUTLINE_RGB = (255, 48, 48)
WARNING_RGB = (255, 210, 0)


class SummaryBuildError(ValueError):
    """The summary image or KOS cannot be built: permanent for this result."""


def build_summary_image(payload: ResultPayload) -> Dataset:
    """The Secondary Capture of the key slice, as read back from its Part 10 encoding."""
    key = _key_slice(payload)
    try:
        rgb = render_summary(payload, key)
    except Exception as exc:  # the decoders raise many types for damaged pixel data
        raise SummaryBuildError(
            f"the key slice of study {payload.study_instance_uid} cannot be rendered: {type(exc).__name__}"
        ) from None
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=key,
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=payload.derived_uid(SUMMARY_SERIES),
            series_number=SUMMARY_SERIES_NUMBER,
            sop_instance_uid=payload.derived_uid(SUMMARY_SOP_INSTANCE),
            instance_number=1,
            manufacturer=MANUFACTURER,
            # The image is the slice in patient space seen from the feet: rows run to the
            # patient's left, columns to posterior (the usual axial display).
            patient_orientation=("L", "P"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise SummaryBuildError(
            f"cannot build the summary image for study {payload.study_instance_uid}: {type(exc).__name__}"
        ) from None
    sc.SeriesDescription = SUMMARY_SERIES_DESCRIPTION
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"  # workstation: rendered by software
    # Text is burned in, but no patient identity: only the finding, score, model and warning.
    sc.BurnedInAnnotation = "NO"
    # General Series: Laterality is required for paired body parts; saying which part this is
    # (the key slice's) tells a checker whether it is one.
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in key:
            setattr(sc, keyword, key.get(keyword))
    sc.ImageComments = f"{DISCLAIMER_ASCII}. {payload.model_name} {payload.model_version}"[:10240]
    sc.DerivationDescription = "Key slice with the AI-flagged region outlined"
    source = Dataset()
    source.ReferencedSOPClassUID = key.SOPClassUID
    source.ReferencedSOPInstanceUID = key.SOPInstanceUID
    sc.SourceImageSequence = [source]
    _stamp(sc, payload)
    return _reread(sc)


def build_key_objects(payload: ResultPayload, summary: Dataset | None = None) -> Dataset:
    """A KOS ("Of Interest") flagging the key slice and, when sent, the summary image."""
    key = _key_slice(payload, pixels=False)
    referenced = [key] + ([summary] if summary is not None else [])
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=payload.identity.device_uid(payload.model_name, payload.model_version),
        name=payload.model_name[:64],
        manufacturer_name=MANUFACTURER,
        model_name=f"{payload.model_name} {payload.model_version}"[:64],
    )
    flag = "flagged" if payload.finding_flag else "not flagged"
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest,
            referenced_objects=referenced,
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.cid270.Device, observer_identifying_attributes=device
            ),
            description=(
                f"{DISCLAIMER_ASCII}: {payload.finding or 'finding'} {flag}, score {payload.triage_score:.3f}"
            )[:1024],
        )
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=referenced,
            content=content,
            series_instance_uid=payload.derived_uid(KOS_SERIES),
            series_number=KOS_SERIES_NUMBER,
            sop_instance_uid=payload.derived_uid(KOS_SOP_INSTANCE),
            instance_number=1,
            manufacturer=MANUFACTURER,
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise SummaryBuildError(
            f"cannot build the key object selection for study {payload.study_instance_uid}: {type(exc).__name__}"
        ) from None
    kos.SeriesDescription = KOS_SERIES_DESCRIPTION
    _stamp(kos, payload)
    return _reread(kos)


def render_summary(payload: ResultPayload, key: Dataset) -> np.ndarray:
    """The summary picture as an (rows, cols, 3) uint8 array: windowed slice, outline, text."""
    hu = key.pixel_array.astype(np.float32) * float(key.get("RescaleSlope", 1)) + float(key.get("RescaleIntercept", 0))
    centre, width = _window(key)
    low = centre - width / 2
    grey = (np.clip((hu - low) / width, 0.0, 1.0) * 255).astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    if payload.key_bbox is not None:
        edge = _region_outline(hu, payload.key_bbox)
        rgb[edge] = OUTLINE_RGB
    picture = Image.fromarray(rgb, "RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE + TEXT_BAND), (0, 0, 0))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    big, small = ImageFont.load_default(size=20), ImageFont.load_default(size=16)
    finding = payload.finding or ("finding" if payload.finding_flag else "no finding")
    verdict = f"FLAGGED: {finding}" if payload.finding_flag else f"Not flagged ({finding})"
    top = IMAGE_SIZE + 8
    _draw_disclaimer(draw, (10, top), big)
    draw.text((10, top + 28), f"{verdict}    score {payload.triage_score:.3f}", fill=(255, 255, 255), font=small)
    draw.text((10, top + 50), f"Model {payload.model_name} {payload.model_version}", fill=(255, 255, 255), font=small)
    if payload.key_bbox is not None:
        draw.text((10, top + 72), "Red outline: the region the finding refers to", fill=OUTLINE_RGB, font=small)
    return np.asarray(canvas, dtype=np.uint8).copy()


def _draw_disclaimer(draw: ImageDraw.ImageDraw, at: tuple[int, int], font) -> None:
    """DISCLAIMER, its em dash drawn as a line: Pillow's built-in font has no glyph for it."""
    before, after = DISCLAIMER.split(" — ")
    x, y = at
    draw.text((x, y), before, fill=WARNING_RGB, font=font)
    x += int(draw.textlength(before + " ", font=font))
    dash = int(draw.textlength("MM", font=font) * 0.6)
    middle = y + int(font.getbbox("x")[3] * 0.65)
    draw.line([(x, middle), (x + dash, middle)], fill=WARNING_RGB, width=2)
    draw.text((x + dash + int(draw.textlength(" ", font=font)), y), after, fill=WARNING_RGB, font=font)


def summary_to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _region_outline(hu: np.ndarray, bbox: tuple[int, int, int, int]) -> np.ndarray:
    """Outline pixels (2 px wide) of the region inside the recorded box, on the whole slice."""
    row0, col0, row1, col1 = bbox
    mask = np.zeros(hu.shape, dtype=bool)
    inside = region_mask(hu)[row0 : row1 + 1, col0 : col1 + 1]
    mask[row0 : row1 + 1, col0 : col1 + 1] = largest_component(inside)
    edge = outline(mask)
    # Thicken outward so a 512-pixel display shows it; the region itself stays visible.
    grown = edge.copy()
    grown[1:, :] |= edge[:-1, :]
    grown[:, 1:] |= edge[:, :-1]
    return grown


def _window(key: Dataset) -> tuple[float, float]:
    """The slice's own first window when it has a usable one, else the brain window."""
    try:
        centre, width = (_first(key.get(keyword)) for keyword in ("WindowCenter", "WindowWidth"))
        if centre is not None and width is not None and float(width) > 1:
            return float(centre), float(width)
    except (TypeError, ValueError):
        pass
    return DEFAULT_WINDOW


def _first(value):
    return value[0] if isinstance(value, MultiValue) else value


def _key_slice(payload: ResultPayload, *, pixels: bool = True) -> Dataset:
    source = payload.key_image
    if source is None:
        raise SummaryBuildError(f"no key slice for study {payload.study_instance_uid}")
    try:
        ds = source if isinstance(source, Dataset) else dcmread(Path(source), stop_before_pixels=not pixels)
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise SummaryBuildError(
            f"the key slice of study {payload.study_instance_uid} cannot be read: {type(exc).__name__}"
        ) from None
    if ds.get("StudyInstanceUID") != payload.study_instance_uid:
        raise SummaryBuildError(f"the key slice belongs to another study than {payload.study_instance_uid}")
    return ds


def _stamp(ds: Dataset, payload: ResultPayload) -> None:
    """Dates from the result, not the clock: a re-send is byte for byte the same object."""
    date = payload.created_at.strftime("%Y%m%d")
    time = payload.created_at.strftime("%H%M%S")
    for prefix in ("Content", "Series", "InstanceCreation"):
        setattr(ds, f"{prefix}Date", date)
        setattr(ds, f"{prefix}Time", time)
    if "TimeOfSecondaryCapture" in ds:
        ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time
    for equipment in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:  # highdicom stamps itself with the clock
            equipment.ContributionDateTime = date + time


def _reread(ds: Dataset) -> Dataset:
    return dcmread(io.BytesIO(summary_to_bytes(ds)))
