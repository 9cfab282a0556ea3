"""training/packaging/bento.py: the BentoML store is the one the pipeline chose, or it says why not."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import ROOT

CODE = """
import os, sys
import bentoml
bentoml.models.list()  # the store is used first, with BENTOML_HOME={first}
os.environ.pop("BENTOML_HOME")
from training.config import load_config
from training.packaging.bento import use_bentoml_home
home = sys.argv[1]
try:
    use_bentoml_home(load_config({{"bentoml_home": home}}, environ={{}}))
except RuntimeError as exc:
    print("REFUSED", exc)
else:
    print("USED", home)
"""


def _run(first, wanted) -> str:
    env = {**os.environ, "BENTOML_HOME": str(first), "BENTOML_DO_NOT_TRACK": "True"}
    out = subprocess.run([sys.executable, "-c", CODE.format(first=first), str(wanted)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_bentoml_imported_with_another_store_is_refused_not_used(tmp_path):
    out = _run(tmp_path / "first", tmp_path / "second")
    assert out.startswith(f"REFUSED bentoml already uses its store at {tmp_path / 'first'}"), out
    assert "set BENTOML_HOME before anything uses bentoml" in out


def test_bentoml_imported_with_the_same_store_is_fine(tmp_path):
    assert _run(tmp_path / "home", tmp_path / "home").startswith("USED"), "same store refused"
