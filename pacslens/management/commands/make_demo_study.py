"""Write a synthetic demonstration study (not patient data) for the tour, tests and benchmarks."""

from __future__ import annotations

import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pacslens.demo_study import MODALITIES, TRANSFER_SYNTAXES, demo_study_write


class Command(BaseCommand):
    help = (
        "Write a synthetic head study (one axial series, fake ZZDEMO^ patient) into OUTDIR, "
        "optionally with a planted hyperdense lesion. Send it with: storescu -aec PACSLENS localhost 11112 +sd OUTDIR"
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("outdir", type=Path)
        parser.add_argument("--lesion", action="store_true", help="plant a hyperdense (acute-blood density) lesion")
        parser.add_argument("--slices", type=int, default=64, help="number of axial slices (default 64)")
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
        if options["slices"] < 1 or options["slices"] > 5000:
            raise CommandError("--slices must be between 1 and 5000")
        if options["size"] < 32 or options["size"] > 2048:
            raise CommandError("--size must be between 32 and 2048")
        started = time.perf_counter()
        study = demo_study_write(
            outdir=options["outdir"],
            lesion=options["lesion"],
            slices=options["slices"],
            modality=options["modality"],
            size=options["size"],
            transfer_syntax=options["transfer_syntax"],
            body_part=options["body_part"],
            corrupt_pixels=options["corrupt_pixels"],
            seed=options["seed"],
        )
        elapsed = time.perf_counter() - started
        kind = "with a hyperdense lesion" if study.lesion else "without lesion"
        self.stdout.write(
            f"Wrote {len(study.paths)} {study.modality} slices {kind} to {options['outdir']} in {elapsed:.1f} s\n"
            f"Study Instance UID {study.study_instance_uid} (synthetic demonstration data, not a patient)"
        )
