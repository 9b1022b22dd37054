"""The development secret key file is created 0600: its mode never depends on a later chmod."""

from __future__ import annotations

import os
import stat
import subprocess

from tests.support.listener_proc import PYTHON, REPO

# With umask 0 and chmod made a no-op, a file written first and restricted afterwards is 0666:
# what others could read between the two calls.
PROGRAM = """
import os, pathlib
os.umask(0)
os.chmod = lambda *a, **k: None
pathlib.Path.chmod = lambda *a, **k: None
import django
django.setup()
"""


def test_the_secret_key_file_is_created_private(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLENS_SECRET_KEY")}
    env.update(PACSLENS_DATA_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="pacslens.settings")
    subprocess.run([PYTHON, "-c", PROGRAM], cwd=REPO, env=env, check=True, timeout=120, capture_output=True)
    key_file = tmp_path / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_text()) == 64
