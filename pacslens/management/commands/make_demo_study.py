"""Write a synthetic demonstration study (not patient data) for the tour, tests and benchmarks."""

from __future__ import annotations

import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pacslens.demo_study import (
    LESION_HU,
    MODALITIES,
    NOISE_SD,
    STORAGES,
    TRANSFER_SYNTAXES,
    LesionSpec,
    Realism,
    demo_study_write,
)


class Command(BaseCommand):
    help = (
        "Write a synthetic head study (one axial series, fake ZZDEMO^ patient) into OUTDIR, "
        "optionally with a planted hyperdense lesion and the artefacts of real head CT. "
        "Send it with: storescu -aec PACSLENS localhost 11112 +sd OUTDIR"
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("outdir", type=Path)
        parser.add_argument("--lesion", action="store_true", help="plant a hyperdense (acute-blood density) lesion")
        parser.add_argument(
            "--lesion-ml", type=float, default=None, help="lesion volume in mL (implies --lesion; default 3.6-17 mL)"
        )
        parser.add_argument(
            "--lesion-hu",
            type=float,
            default=None,
            help=f"lesion density in HU (implies --lesion; default {LESION_HU:g})",
        )
        parser.add_argument(
            "--lesion-position",
            default=None,
            metavar="X,Y,Z",
            help="lesion centre in mm from the brain's centre (x left-right, y front-back, z up); default random",
        )
        parser.add_argument(
            "--slices",
            type=int,
            default=None,
            help="number of axial slices (default 64, or the head at --slice-thickness)",
        )
        parser.add_argument(
            "--slice-thickness",
            type=float,
            default=None,
            help="slice thickness and spacing in mm, e.g. 0.625 or 5 (default: the slices spread over the head)",
        )
        parser.add_argument(
            "--pixel-spacing", type=float, default=None, help="mm per pixel, e.g. 0.4-1.0 (default 256 mm / --size)"
        )
        parser.add_argument("--noise", type=float, default=NOISE_SD, help=f"image noise σ in HU (default {NOISE_SD:g})")
        parser.add_argument(
            "--calcifications", action="store_true", help="pineal and choroid plexus calcifications (100-400 HU)"
        )
        parser.add_argument(
            "--beam-hardening",
            type=float,
            default=0.0,
            metavar="HU",
            help="a band this many HU brighter inside the skull (beam-hardening artefact; default 0: none)",
        )
        parser.add_argument(
            "--storage",
            choices=STORAGES,
            default="unsigned",
            help="unsigned 12-bit with rescale intercept -1024 (default) or signed 16-bit with intercept 0",
        )
        parser.add_argument("--modality", choices=MODALITIES, default="CT")
        parser.add_argument("--size", type=int, default=512, help="rows and columns (default 512)")
        parser.add_argument("--body-part", default="HEAD", help="Body Part Examined (default HEAD)")
        parser.add_argument(
            "--transfer-syntax",
            choices=sorted(TRANSFER_SYNTAXES),
            default="explicit",
            help="explicit (Explicit VR Little Endian, default) or a lossless compressed syntax",
        )
        parser.add_argument(
            "--corrupt-pixels",
            action="store_true",
            help="make every other slice half as tall (each file valid): exercises the failure path",
        )
        parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable studies")

    def handle(self, *args, **options) -> None:
        thickness = options["slice_thickness"]
        if thickness is not None and not 0.1 <= thickness <= 20:
            raise CommandError("--slice-thickness must be between 0.1 and 20 mm")
        slices = options["slices"]
        if slices is None:
            slices = 64 if thickness is None else max(1, round(150 / thickness))
        if slices < 1 or slices > 5000:
            raise CommandError("--slices must be between 1 and 5000")
        if options["size"] < 32 or options["size"] > 2048:
            raise CommandError("--size must be between 32 and 2048")
        if options["pixel_spacing"] is not None and not 0.1 <= options["pixel_spacing"] <= 5:
            raise CommandError("--pixel-spacing must be between 0.1 and 5 mm")
        if not 0 <= options["noise"] <= 200:
            raise CommandError("--noise must be between 0 and 200 HU")
        if not -200 <= options["beam_hardening"] <= 200:
            raise CommandError("--beam-hardening must be between -200 and 200 HU")
        lesion: bool | LesionSpec = options["lesion"]
        position = None
        if options["lesion_position"]:
            try:
                x, y, z = (float(v) for v in options["lesion_position"].split(","))
            except ValueError:
                raise CommandError("--lesion-position must be three numbers: X,Y,Z (mm)") from None
            position = (x, y, z)
        if options["lesion_ml"] is not None or options["lesion_hu"] is not None or position is not None:
            if options["lesion_ml"] is not None and not 0.01 <= options["lesion_ml"] <= 200:
                raise CommandError("--lesion-ml must be between 0.01 and 200")
            hu = options["lesion_hu"] if options["lesion_hu"] is not None else LESION_HU
            if not -100 <= hu <= 3000:
                raise CommandError("--lesion-hu must be between -100 and 3000")
            lesion = LesionSpec(ml=options["lesion_ml"], hu=hu, position=position)
        started = time.perf_counter()
        study = demo_study_write(
            outdir=options["outdir"],
            lesion=lesion,
            slices=slices,
            modality=options["modality"],
            size=options["size"],
            transfer_syntax=options["transfer_syntax"],
            body_part=options["body_part"],
            corrupt_pixels=options["corrupt_pixels"],
            seed=options["seed"],
            realism=Realism(
                noise_sd=options["noise"],
                calcifications=options["calcifications"],
                beam_hardening=options["beam_hardening"],
            ),
            slice_thickness=thickness,
            pixel_spacing=options["pixel_spacing"],
            storage=options["storage"],
        )
        elapsed = time.perf_counter() - started
        kind = "with a hyperdense lesion" if study.lesion else "without lesion"
        if study.lesion_ml is not None:
            kind += f" ({study.lesion_ml:.1f} mL)"
        self.stdout.write(
            f"Wrote {len(study.paths)} {study.modality} slices {kind} to {options['outdir']} in {elapsed:.1f} s\n"
            f"Study Instance UID {study.study_instance_uid} (synthetic demonstration data, not a patient)"
        )
