"""tests/helpers.py's ``require``: a test that needs a tool skips without it, except under CI, where it fails."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import require


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_a_missing_tool_fails_under_ci(monkeypatch, ci):
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "buildah" else f"/usr/bin/{name}")
    with pytest.raises(pytest.fail.Exception, match=f"^CI={ci} but missing buildah: run .ci/setup-container-tools.sh "
                                                     r"\(.ci/run sets it up\)$"):
        require("buildah", "missing buildah: run .ci/setup-container-tools.sh", {"CI": ci})


@pytest.mark.parametrize("environ", [{}, {"CI": "false"}, {"CI": ""}, {"CI": "0"}, {"CI": "no"}])
def test_a_missing_tool_skips_outside_ci(monkeypatch, environ):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="^curl is not installed: apt-get install curl$"):
        require("curl", "curl is not installed: apt-get install curl", environ)


def test_a_condition_counts_as_a_tool():
    with pytest.raises(pytest.fail.Exception, match="^CI=true but not root"):
        require(False, "not root", {"CI": "true"})
    with pytest.raises(pytest.skip.Exception, match="^not root$"):
        require(False, "not root", {})
    assert require(True, "not root", {"CI": "true"}) is None


def test_a_present_tool_neither_skips_nor_fails(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert require("podman", "missing podman", {"CI": "true"}) is None
