"""manage.py evaluate_model: the demonstration model on a seeded case mix and on a labelled folder."""

from __future__ import annotations

import csv

import pytest
from django.core.management import CommandError, call_command

from pacslens.demo_study import LesionSpec, Realism, demo_study_write
from pacslens.evaluation import Outcome, auc, case_mix, evaluate, metrics
from results.inference.demo_model import NAME, ensure_demo_setup
from results.models import AIModel

pytestmark = pytest.mark.django_db


@pytest.fixture
def demo_model(data_dir):
    ensure_demo_setup()
    return AIModel.objects.get(name=NAME)


def test_a_seeded_mix_meets_the_bar(demo_model):
    """Issue 15: sensitivity and specificity of at least 0.95 on a mix with noise and calcifications."""
    cases = case_mix(cases=16, seed=15)
    assert {c.conditions["noise"] for c in cases} >= {"σ 12 HU"}
    assert {c.conditions["calcification"] for c in cases} == {"yes", "no"}
    outcomes = evaluate(model=demo_model, cases=cases)
    m = metrics(outcomes)
    assert m.errors == 0 and m.tp + m.fn == 8 and m.tn + m.fp == 8
    assert m.sensitivity is not None and m.sensitivity >= 0.95
    assert m.specificity is not None and m.specificity >= 0.95
    assert m.auc is not None and m.auc >= 0.95


def test_the_mix_is_repeatable_and_covers_the_conditions():
    first, second = case_mix(cases=40, seed=3), case_mix(cases=40, seed=3)
    assert [c.conditions for c in first] == [c.conditions for c in second]
    assert [c.conditions for c in first] != [c.conditions for c in case_mix(cases=40, seed=4)]
    seen = {key: {c.conditions[key] for c in first} for key in first[0].conditions}
    assert len(seen["slice thickness"]) == 4 and len(seen["lesion size"]) == 4  # three sizes and none
    assert sum(c.label for c in first) == 20


def test_auc_counts_ties_half():
    def o(label, score):
        return Outcome(label=label, conditions={}, score=score, flagged=score >= 0.5)

    assert auc([o(True, 0.9), o(False, 0.1)]) == 1.0
    assert auc([o(True, 0.3), o(False, 0.3)]) == 0.5
    assert auc([o(True, 0.9)]) is None


def test_the_command_prints_the_tables(demo_model, capsys):
    call_command("evaluate_model", NAME, "--cases", "4", "--seed", "1", "--quiet", "--cases-list")
    out = capsys.readouterr().out
    assert f"{NAME} 2.0: 4 studies, threshold 0.5" in out
    assert "| lesion | 2 (TP) | 0 (FN) |" in out and "| no lesion | 0 (FP) | 2 (TN) |" in out
    assert "Sensitivity 1.000  Specificity 1.000  AUC 1.000" in out
    for heading in ("| noise |", "| calcification |", "| lesion size |", "| slice thickness |"):
        assert heading in out
    assert "Time per study (read, preprocess, run): median" in out


def test_a_labelled_folder(demo_model, tmp_path, capsys):
    folder = tmp_path / "studies"
    hard = Realism(noise_sd=10, calcifications=True)
    lesion = demo_study_write(
        outdir=folder / "a",
        slices=30,
        slice_thickness=5,
        size=256,
        realism=hard,
        seed=1,
        lesion=LesionSpec(ml=2, hu=65),
    )
    clean = demo_study_write(outdir=folder / "b", slices=30, slice_thickness=5, size=256, realism=hard, seed=2)
    (folder / "notes.txt").write_text("not DICOM")
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["StudyInstanceUID", "label", "site"])
        writer.writerow([lesion.study_instance_uid, "positive", "north"])
        writer.writerow([clean.study_instance_uid, "0", "south"])
        writer.writerow(["1.2.3.4", "1", "south"])  # listed, but no files: not scored, and said so
    call_command("evaluate_model", NAME, "--folder", str(folder), "--quiet")
    out = capsys.readouterr().out
    assert "| lesion | 1 (TP) | 0 (FN) |" in out and "| no lesion | 0 (FP) | 1 (TN) |" in out
    assert "(1 not scored)" in out and "Not scored (1): no files for this study" in out
    assert "| site | n |" in out and "| north | 1 | 1 | 0 | 0 | 0 |" in out


def test_bad_input_is_a_clear_error(demo_model, tmp_path):
    with pytest.raises(CommandError, match="no registered model nope"):
        call_command("evaluate_model", "nope")
    with pytest.raises(CommandError, match="labels CSV"):
        call_command("evaluate_model", NAME, "--folder", str(tmp_path))
    (tmp_path / "labels.csv").write_text("uid,verdict\n1.2.3,1\n")
    with pytest.raises(CommandError, match="StudyInstanceUID and label"):
        call_command("evaluate_model", NAME, "--folder", str(tmp_path))
    (tmp_path / "labels.csv").write_text("StudyInstanceUID,label\n1.2.3,maybe\n")
    with pytest.raises(CommandError, match="line 2: label must be"):
        call_command("evaluate_model", NAME, "--folder", str(tmp_path))
