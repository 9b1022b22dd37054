"""register_model: manifest validation with every bad field named, file checks, idempotence."""

from __future__ import annotations

import hashlib

import pytest
import yaml
from django.core.management import CommandError, call_command

from results.inference.demo_model import demo_model_write
from results.inference.manifest import ManifestError, manifest_normalize, manifest_problems
from results.models import AIModel

pytestmark = pytest.mark.django_db


@pytest.fixture
def manifest_file(tmp_path):
    path, _ = demo_model_write(directory=tmp_path / "src")
    return path


def rewrite(path, **changes):
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        target = data
        *parents, last = dotted.split("__")
        for key in parents:
            target = target[key]
        if value is ...:
            del target[last]
        else:
            target[last] = value
    path.write_text(yaml.safe_dump(data))
    return path


class TestRegister:
    def test_it_registers_and_copies_the_file_under_the_data_dir(self, data_dir, manifest_file, capsys):
        call_command("register_model", str(manifest_file))
        model = AIModel.objects.get()
        assert model.file.startswith("models/demo-hyperdense-head-ct/2.0/")
        assert model.file_path.is_file()
        assert hashlib.sha256(model.file_path.read_bytes()).hexdigest() == model.sha256
        assert model.demonstration and model.accepts_modalities == ["CT"]
        out = capsys.readouterr().out
        assert "Registered demo-hyperdense-head-ct 2.0" in out and "NOT FOR CLINICAL USE" in out

    def test_registering_again_is_a_no_op(self, data_dir, manifest_file, capsys):
        call_command("register_model", str(manifest_file))
        call_command("register_model", str(manifest_file))
        assert AIModel.objects.count() == 1
        assert "Already registered" in capsys.readouterr().out

    def test_the_same_version_with_another_manifest_is_refused(self, data_dir, manifest_file):
        call_command("register_model", str(manifest_file))
        rewrite(manifest_file, output__threshold=0.7)
        with pytest.raises(CommandError, match="give this one a new version"):
            call_command("register_model", str(manifest_file))

    @pytest.mark.parametrize(
        "field, value", [("version", "../../escape"), ("version", "1.0/x"), ("version", ".."), ("name", "demo..x")]
    )
    def test_a_name_or_version_that_is_not_one_safe_path_component_is_refused(
        self, data_dir, manifest_file, field, value
    ):
        rewrite(manifest_file, **{field: value})
        with pytest.raises(CommandError, match=f"{field}: required"):
            call_command("register_model", str(manifest_file))
        assert not AIModel.objects.exists()
        assert sorted(p.name for p in data_dir.rglob("*.onnx")) == []

    def test_a_wrong_sha256_is_refused(self, data_dir, manifest_file):
        rewrite(manifest_file, sha256="a" * 64)
        with pytest.raises(CommandError, match="sha256: the file's SHA-256 is"):
            call_command("register_model", str(manifest_file))
        assert not AIModel.objects.exists()

    def test_names_that_do_not_exist_in_the_model_are_refused(self, data_dir, manifest_file):
        rewrite(manifest_file, input__name="image", output__score="probability", input__shape=[1, 1, 8, 64, 64])
        with pytest.raises(CommandError) as excinfo:
            call_command("register_model", str(manifest_file))
        text = str(excinfo.value)
        assert "input.name: the model has no input 'image' (it has volume)" in text
        assert "output.score: the model has no output 'probability'" in text

    def test_a_shape_mismatch_is_refused(self, data_dir, manifest_file):
        rewrite(manifest_file, input__shape=[1, 1, 8, 64, 64])
        with pytest.raises(CommandError, match="input.shape: the model's input shape is"):
            call_command("register_model", str(manifest_file))

    def test_a_missing_file_and_unreadable_manifest(self, data_dir, manifest_file, tmp_path):
        rewrite(manifest_file, file="nope.onnx")
        with pytest.raises(CommandError, match="file: .*nope.onnx does not exist"):
            call_command("register_model", str(manifest_file))
        with pytest.raises(CommandError, match="cannot read"):
            call_command("register_model", str(tmp_path / "missing.yaml"))
        (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
        with pytest.raises(CommandError, match="not valid YAML"):
            call_command("register_model", str(tmp_path / "bad.yaml"))

    def test_a_file_that_is_not_onnx_is_refused(self, data_dir, manifest_file):
        model_path = manifest_file.parent / "junk.onnx"
        model_path.write_bytes(b"not a model")
        rewrite(manifest_file, file="junk.onnx", sha256=hashlib.sha256(b"not a model").hexdigest())
        with pytest.raises(CommandError, match="onnxruntime cannot load it"):
            call_command("register_model", str(manifest_file))


class TestManifestValidation:
    def test_every_bad_field_is_reported_at_once(self):
        problems = manifest_problems(
            {
                "name": "has spaces",
                "version": 1.10,
                "sha256": "XYZ",
                "accepts": {"modalities": [], "body_parts": "HEAD", "sex": "F"},
                "series": {"orientation": "sagittal", "min_slices": 10, "max_slices": 5},
                "input": {"name": "", "shape": [2, 1, 4, 4], "window": {"center": 40}, "resize": "cubic"},
                "output": {"threshold": "high", "labels": ["a"]},
                "colour": "red",
            }
        )
        assert set(problems) == {
            "name",
            "version",
            "file",
            "sha256",
            "intended_use",
            "accepts.modalities",
            "accepts.body_parts",
            "accepts.sex",
            "series.orientation",
            "series.max_slices",
            "input.name",
            "input.shape",
            "input.window",
            "input.resize",
            "output.score",
            "output.threshold",
            "output.labels",
            "colour",
        }
        assert "quote numbers" in problems["version"]
        assert "min_slices (10)" in problems["series.max_slices"]

    def test_missing_sections(self):
        problems = manifest_problems({})
        assert {"accepts", "input", "output"} <= set(problems)

    def test_defaults_are_filled_in(self, manifest_file):
        data = yaml.safe_load(manifest_file.read_text())
        del data["series"]
        del data["input"]["resize"]
        normal = manifest_normalize(data)
        assert normal["series"] == {
            "orientation": "axial",
            "min_slices": 1,
            "max_slices": 10000,
            "choose": "most_slices",
        }
        assert normal["input"]["resize"] == "linear"

    def test_manifest_error_lists_fields(self):
        with pytest.raises(ManifestError) as excinfo:
            manifest_normalize({"name": "ok"})
        assert "version:" in str(excinfo.value) and "sha256:" in str(excinfo.value)
