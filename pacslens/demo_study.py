"""Synthetic head studies for the tour, the tests and the benchmarks. Not patient data.

A study is a stack of axial slices through a simple head phantom: air, scalp, skull, brain
(grey and white matter, ventricles), optionally with a planted hyperdense lesion at acute-blood
density, and with what makes real head CT hard for a naive model: image noise, physiological
calcifications (pineal gland, choroid plexus) and a beam-hardening band inside the skull.
The geometry (slice thickness, pixel spacing) and the storage convention (unsigned with
rescale intercept -1024, or signed with intercept 0) are options too. Every file carries full patient/study/series/equipment/image modules, unique UIDs,
positions and rescale parameters, and a fake patient whose name starts with ZZDEMO^ so nobody
can mistake it for a real one. Slices are written straight from numpy with pydicom.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
}
MODALITIES = ("CT", "MR")
PIXELS = ("phantom", "noise")
PIXEL_SPACING_MM = 0.5  # 512 pixels cover a 256 mm field of view
HEAD_EXTENT_MM = 150.0  # skull base to vertex, whatever the slice count (unless a thickness is given)
STACK_CENTRE_MM = 75.0  # the middle of that extent, in the phantom's z
RESCALE_INTERCEPT = -1024.0
STORAGES = ("unsigned", "signed")  # unsigned: 12 bits, intercept -1024; signed: 16 bits, intercept 0
# Phantom densities (HU) and MR intensities (arbitrary units) per tissue.
TISSUES = {  # name: (CT HU, MR value)
    "air": (-1000, 0),
    "scalp": (30, 500),
    "bone": (900, 80),
    "grey": (38, 700),
    "white": (28, 850),
    "csf": (6, 250),
    "lesion": (68, 760),
}
NOISE_SD = 4.0
LESION_HU = 68.0
LESION_SKULL_GAP_MM = 5.0
BEAM_HARDENING_WIDTH_MM = 5.0  # the band fades from its amplitude at the inner table to 0 this far in
FIRST_NAMES = ("ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT", "GOLF", "HOTEL")


@dataclass
class DemoStudy:
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    lesion: bool
    paths: list[Path] = field(default_factory=list)
    lesion_center_mm: tuple[float, float, float] | None = None
    lesion_radius_mm: float | None = None
    lesion_ml: float | None = None
    datasets: list[Dataset] = field(default_factory=list)


@dataclass(frozen=True)
class Realism:
    """What makes a synthetic head CT look like a scanner's: all off or mild by default.

    noise_sd: image noise (HU, per voxel as stored); calcifications: pineal gland and choroid
    plexus foci of 100-400 HU, 2-5 mm across, near the midline; beam_hardening: a band of this many HU added
    to the brain next to the inner table of the skull, fading over BEAM_HARDENING_WIDTH_MM.
    """

    noise_sd: float = NOISE_SD
    calcifications: bool = False
    beam_hardening: float = 0.0


@dataclass(frozen=True)
class LesionSpec:
    """A planted hyperdense region: volume (mL), density (HU) and centre (mm from the brain's
    centre: x left-right, y front-back, z up), or None for a random place inside the brain."""

    ml: float | None = None  # None: 10-17 mm radius, as the tour's lesion always was
    hu: float = LESION_HU
    position: tuple[float, float, float] | None = None


def demo_study_write(
    *,
    outdir: Path | None,
    lesion: bool | LesionSpec = False,
    slices: int = 64,
    modality: str = "CT",
    size: int = 512,
    transfer_syntax: str = "explicit",
    body_part: str = "HEAD",
    corrupt_pixels: bool = False,
    seed: int | None = None,
    rows: int | None = None,
    columns: int | None = None,
    pixels: str = "phantom",
    attributes: Mapping[str, Any] | None = None,
    realism: Realism | None = None,
    slice_thickness: float | None = None,
    pixel_spacing: float | None = None,
    storage: str = "unsigned",
) -> DemoStudy:
    """Write one synthetic study (one axial series) as `slices` files under `outdir`.

    `lesion`: True for the tour's lesion (random size and place), a LesionSpec to choose them.
    `realism`: noise, calcifications, beam hardening (default: mild noise only).
    `slice_thickness` (mm): slices this thick and this far apart, centred on the head (default:
    `slices` spread over the 150 mm of the head); `pixel_spacing` (mm, default 256 mm over the
    longer side); `storage`: unsigned (12 bits, intercept -1024) or signed (16 bits, intercept 0).

    The tests and benchmarks also ask for: `outdir=None`, to keep the slices in memory
    (`DemoStudy.datasets`) instead of writing files; `rows`/`columns`, a non-square image
    (both default to `size`); `pixels="noise"`, one block of uniform noise shifted per slice
    instead of the phantom (memcpy speed at any size: a single 100 MB instance, a
    300-slice series); `attributes`, header attributes by DICOM keyword set on every slice
    (a given StudyInstanceUID, a named test patient).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}")
    if slices < 1:
        raise ValueError("a study needs at least one slice")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer syntax must be one of {', '.join(TRANSFER_SYNTAXES)}")
    if pixels not in PIXELS:
        raise ValueError(f"pixels must be one of {', '.join(PIXELS)}")
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}")
    if lesion and pixels != "phantom":
        raise ValueError("only the phantom has a lesion")
    if slice_thickness is not None and not 0.1 <= slice_thickness <= 20:
        raise ValueError("slice thickness must be between 0.1 and 20 mm")
    if pixel_spacing is not None and not 0.1 <= pixel_spacing <= 5:
        raise ValueError("pixel spacing must be between 0.1 and 5 mm")
    spec = LesionSpec() if lesion is True else (lesion or None)
    if spec is not None and spec.ml is not None and not 0.01 <= spec.ml <= 200:
        raise ValueError("lesion volume must be between 0.01 and 200 mL")
    realism = realism or Realism()
    rows, columns = rows or size, columns or size
    spacing_mm = pixel_spacing or _pixel_spacing(rows, columns)
    rng = np.random.default_rng(seed)
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
    template = _series_template(
        modality=modality,
        body_part=body_part,
        lesion=spec is not None,
        rows=rows,
        columns=columns,
        rng=rng,
        pixel_spacing=spacing_mm,
        storage=storage,
    )
    for keyword, value in (attributes or {}).items():
        setattr(template, keyword, value)
    phantom = (
        _Phantom(rows=rows, columns=columns, rng=rng, lesion=spec, realism=realism, pixel_spacing=spacing_mm)
        if pixels == "phantom"
        else None
    )
    study = DemoStudy(
        study_instance_uid=template.StudyInstanceUID,
        series_instance_uid=template.SeriesInstanceUID,
        modality=modality,
        lesion=spec is not None,
        lesion_center_mm=phantom.lesion_center if phantom else None,
        lesion_radius_mm=phantom.lesion_radius if phantom else None,
        lesion_ml=phantom.lesion_ml if phantom else None,
    )
    if slice_thickness is None:
        spacing = HEAD_EXTENT_MM / slices
        positions = [(index + 0.5) * spacing for index in range(slices)]
    else:
        spacing = slice_thickness
        positions = [STACK_CENTRE_MM + (index - (slices - 1) / 2) * spacing for index in range(slices)]
    stored_slices = (
        _phantom_slices(
            phantom, positions=positions, modality=modality, rng=rng, noise_sd=realism.noise_sd, storage=storage
        )
        if phantom
        else _noise_slices(rows=rows, columns=columns, slices=slices, rng=rng)
    )
    ts_uid = TRANSFER_SYNTAXES[transfer_syntax]
    for index, stored in enumerate(stored_slices):
        z = positions[index]
        ds = _slice_dataset(template, index=index, z=z, spacing=spacing, modality=modality)
        ds.PixelData = stored
        if ts_uid != ExplicitVRLittleEndian:
            ds.compress(ts_uid, encoding_plugin="pylibjpeg" if ts_uid == RLELossless else "")
        else:
            ds.file_meta.TransferSyntaxUID = ts_uid
        if corrupt_pixels and index % 2:
            # Half the pixel data, declared as 8-bit: each file is whole (the listener refuses
            # cut-short pixel data), but the series is 16-bit, so inference cannot read them.
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        if outdir is None:
            study.datasets.append(ds)
            continue
        path = outdir / f"{modality}{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        study.paths.append(path)
    return study


def _phantom_slices(
    phantom: _Phantom,
    *,
    positions: list[float],
    modality: str,
    rng: np.random.Generator,
    noise_sd: float,
    storage: str,
) -> Iterator[bytes]:
    """The phantom's stored pixel values, slice by slice, with noise."""
    shape = (phantom.rows, phantom.columns)
    # A small bank of noise fields, rolled per slice: drawing 78 M normals for a 300-slice study
    # would dominate the run time and the phantom does not need independent noise per slice.
    noise_bank = [rng.normal(0, 1, shape).astype(np.float32) for _ in range(4)]
    tissue_values: dict[str, float] = {name: values[0 if modality == "CT" else 1] for name, values in TISSUES.items()}
    if phantom.lesion_hu is not None and modality == "CT":
        tissue_values["lesion"] = phantom.lesion_hu
    for index, z in enumerate(positions):
        values = phantom.slice_values(z, tissue_values, ct=modality == "CT")
        axis = index % 2
        noise = np.roll(noise_bank[index % 4], shift=int(rng.integers(0, shape[axis])), axis=axis)
        if modality != "CT":
            stored = np.clip(np.rint(values + noise * noise_sd * 5), 0, 4095).astype(np.uint16)
        elif storage == "signed":
            stored = np.clip(np.rint(values + noise * noise_sd), -1024, 3071).astype("<i2")
        else:
            values = values + noise * noise_sd
            stored = np.clip(np.rint(values - RESCALE_INTERCEPT), 0, 4095).astype(np.uint16)
        yield stored.tobytes()


def _noise_slices(*, rows: int, columns: int, slices: int, rng: np.random.Generator) -> Iterator[bytes]:
    """One block of 12-bit noise, shifted per slice: distinct content per instance at memcpy speed."""
    block = rng.integers(0, 4096, size=rows * columns + slices, dtype=np.uint16).tobytes()
    for index in range(slices):
        yield block[2 * index : 2 * (index + rows * columns)]


class _Phantom:
    """Nested ellipsoids in patient coordinates (mm): x left-right, y front-back, z up."""

    def __init__(
        self,
        *,
        rows: int,
        columns: int,
        rng: np.random.Generator,
        lesion: LesionSpec | None,
        realism: Realism,
        pixel_spacing: float,
    ) -> None:
        self.rows, self.columns = rows, columns
        x = (np.arange(columns, dtype=np.float32) - (columns - 1) / 2) * pixel_spacing
        y = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * pixel_spacing
        self.x2 = (x**2)[np.newaxis, :]
        self.y2 = (y**2)[:, np.newaxis]
        self.x = x[np.newaxis, :]
        self.y = y[:, np.newaxis]
        jitter = rng.uniform(0.93, 1.07)
        # (semi-axes x, y, z; centre z)
        self.brain = (62 * jitter, 80 * jitter, 78, 70.0)
        self.white = (44 * jitter, 60 * jitter, 52, 72.0)
        self.skull = (self.brain[0] + 6, self.brain[1] + 6, self.brain[2] + 6, 70.0)
        self.head = (self.brain[0] + 11, self.brain[1] + 11, self.brain[2] + 11, 70.0)
        self.beam_hardening = realism.beam_hardening
        # Calcified foci (centre x, y, z; radius; HU): the pineal gland behind the third
        # ventricle and the choroid plexus in the atria of both lateral ventricles.
        self.calcifications: list[tuple[float, float, float, float, float]] = []
        if realism.calcifications:
            for cx, cy, cz in ((0.0, 14.0, 74.0), (-12.0, 16.0, 82.0), (12.0, 16.0, 82.0)):
                self.calcifications.append(
                    (
                        cx + float(rng.uniform(-1.5, 1.5)),
                        cy + float(rng.uniform(-2, 2)),
                        cz + float(rng.uniform(-2, 2)),
                        float(rng.uniform(1.0, 2.5)),
                        float(rng.uniform(100, 400)),
                    )
                )
        self.lesion_center: tuple[float, float, float] | None = None
        self.lesion_radius: float | None = None
        self.lesion_ml: float | None = None
        self.lesion_hu: float | None = None
        if lesion is not None:
            self.lesion_hu = lesion.hu
            if lesion.ml is None:
                self.lesion_radius = float(rng.uniform(10, 17))
            else:
                # An ellipsoid r x 0.85 r x r of that volume.
                self.lesion_radius = float((3 * lesion.ml * 1000 / (4 * math.pi * 0.85)) ** (1 / 3))
            self.lesion_ml = 4 / 3 * math.pi * 0.85 * self.lesion_radius**3 / 1000
            if lesion.position is not None:
                px, py, pz = lesion.position
                self.lesion_center = (px, py, pz + self.brain[3])
            elif lesion.ml is None:
                # The tour's lesion: well inside the brain, off the ventricles.
                angle = rng.uniform(0, 2 * math.pi)
                r = rng.uniform(0.35, 0.55)
                self.lesion_center = (
                    float(r * self.brain[0] * math.cos(angle)),
                    float(r * self.brain[1] * math.sin(angle)),
                    float(rng.uniform(50, 95)),
                )
            else:
                self.lesion_center = self._random_place_in_brain(rng, self.lesion_radius)

    def _random_place_in_brain(self, rng: np.random.Generator, radius: float) -> tuple[float, float, float]:
        """Uniform in the brain, the whole lesion in the parenchyma: its edge at least 5 mm from the
        inner table of the skull (blood against the skull is extra-axial, another finding)."""
        a, b, c = (axis - radius - LESION_SKULL_GAP_MM for axis in self.brain[:3])
        zc = self.brain[3]
        while True:
            point = rng.uniform(-1, 1, 3)
            if float(np.sum(point**2)) <= 1:
                return (float(point[0] * a), float(point[1] * b), float(point[2] * c + zc))

    def _inside(
        self,
        axes: tuple[float, float, float, float],
        z: float,
        cx: float = 0.0,
        cy: float = 0.0,
    ) -> np.ndarray | None:
        a, b, c, zc = axes
        scale2 = 1 - ((z - zc) / c) ** 2
        if scale2 <= 0:
            return None
        if cx or cy:
            return ((self.x - cx) ** 2) / (a * a * scale2) + ((self.y - cy) ** 2) / (b * b * scale2) <= 1
        return self.x2 / (a * a * scale2) + self.y2 / (b * b * scale2) <= 1

    def slice_values(self, z: float, tissue: dict[str, float], *, ct: bool = True) -> np.ndarray:
        values = np.full((self.rows, self.columns), tissue["air"], np.float32)
        for axes, name in ((self.head, "scalp"), (self.skull, "bone"), (self.brain, "grey"), (self.white, "white")):
            mask = self._inside(axes, z)
            if mask is not None:
                values[mask] = tissue[name]
        for cx in (-9.0, 9.0):  # lateral ventricles
            mask = self._inside((5, 22, 18, 80.0), z, cx=cx, cy=-4.0)
            if mask is not None:
                values[mask] = tissue["csf"]
        if ct and self.beam_hardening:
            self._add_beam_hardening(values, z)
        if ct:
            for cx, cy, cz, radius, hu in self.calcifications:
                mask = self._inside((radius, radius, radius, cz), z, cx=cx, cy=cy)
                if mask is not None:
                    values[mask] = hu
        if self.lesion_center and self.lesion_radius:
            cx, cy, cz = self.lesion_center
            r = self.lesion_radius
            mask = self._inside((r, r * 0.85, r, cz), z, cx=cx, cy=cy)
            if mask is not None:
                values[mask] = tissue["lesion"]
        return values

    def _add_beam_hardening(self, values: np.ndarray, z: float) -> None:
        """Brighten the brain next to the inner table: the cupping/streak band of real head CT."""
        a, b, c, zc = self.brain
        scale2 = 1 - ((z - zc) / c) ** 2
        if scale2 <= 0:
            return
        a_z, b_z = a * math.sqrt(scale2), b * math.sqrt(scale2)
        rho = np.sqrt(self.x2 / (a_z * a_z) + self.y2 / (b_z * b_z))
        # Distance to the inner table, roughly: the ellipse's local radius times (1 - rho).
        radius = np.sqrt((self.x2 + self.y2) / np.maximum(rho * rho, 1e-6))
        depth = (1 - rho) * np.minimum(radius, max(a_z, b_z))
        # Near the vertex the slice cuts the skull obliquely: the band is as far in from the
        # inner table along z as well.
        depth = np.minimum(depth, (c - abs(z - zc)) * np.ones_like(depth))
        band = self.beam_hardening * np.clip(1 - depth / BEAM_HARDENING_WIDTH_MM, 0, 1)
        values += np.where(rho < 1, band, 0).astype(np.float32)


def _pixel_spacing(rows: int, columns: int) -> float:
    """Millimetres per pixel: the longer side always covers the same field of view."""
    return PIXEL_SPACING_MM * 512 / max(rows, columns)


def _series_template(
    *,
    modality: str,
    body_part: str,
    lesion: bool,
    rows: int,
    columns: int,
    rng: np.random.Generator,
    pixel_spacing: float,
    storage: str,
) -> Dataset:
    now = datetime.now()
    number = int(rng.integers(100000, 999999))
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    # Patient: fake by construction (ZZDEMO^ sorts last in any worklist and is easy to purge).
    ds.PatientName = f"ZZDEMO^{FIRST_NAMES[number % len(FIRST_NAMES)]}{number % 1000:03d}"
    ds.PatientID = f"DEMO{number}"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.PatientAge = f"{now.year - 1960:03d}Y"
    ds.PatientIdentityRemoved = "NO"
    # General Study
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.AccessionNumber = f"DEMO{number}"[:16]
    ds.ReferringPhysicianName = "ZZDEMO^REFERRER"
    ds.StudyID = str(number % 100000)
    head = body_part.upper() in ("HEAD", "BRAIN")
    ds.StudyDescription = f"{modality} {'HEAD' if head else body_part.upper()} WO CONTRAST (DEMO)"
    # General Series
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 2
    ds.SeriesDescription = "Axial demo" + (" lesion" if lesion else "")
    ds.BodyPartExamined = body_part.upper()
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = "PacsLens"
    ds.ManufacturerModelName = "Synthetic demo study"
    ds.StationName = "DEMO"
    ds.SoftwareVersions = "pacslens-demo"
    ds.InstitutionName = "PacsLens demonstration"
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [round(pixel_spacing, 6)] * 2
    ds.BitsAllocated = 16
    signed = modality == "CT" and storage == "signed"
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = "PacsLens synthetic demonstration image: not a patient, not for clinical use"
    if modality == "CT":
        ds.SOPClassUID = CTImageStorage
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleIntercept = 0 if signed else RESCALE_INTERCEPT
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.ConvolutionKernel = "H30s"
        ds.WindowCenter = 40
        ds.WindowWidth = 80
    else:
        ds.SOPClassUID = MRImageStorage
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500
        ds.EchoTime = 15
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 1.5
        ds.WindowCenter = 600
        ds.WindowWidth = 1000
    return ds


def _slice_dataset(template: Dataset, *, index: int, z: float, spacing: float, modality: str) -> Dataset:
    ds = Dataset()
    ds.update(template)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = index + 1
    ds.AcquisitionNumber = 1
    ds.SliceThickness = round(spacing, 4)
    ds.SpacingBetweenSlices = round(spacing, 4) if modality == "MR" else None
    if ds.SpacingBetweenSlices is None:
        del ds.SpacingBetweenSlices
    spacing_mm = float(template.PixelSpacing[0])
    half_width, half_height = (template.Columns - 1) / 2 * spacing_mm, (template.Rows - 1) / 2 * spacing_mm
    ds.ImagePositionPatient = [-half_width, -half_height, round(z, 4)]
    ds.SliceLocation = round(z, 4)
    now = datetime.now()
    ds.ContentDate = template.StudyDate
    ds.ContentTime = now.strftime("%H%M%S")
    ds.InstanceCreationDate = template.StudyDate
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = template.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PACSLENS_DEMO"
    ds.file_meta = meta
    return ds
