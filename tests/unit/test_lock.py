"""uv.lock installs from wheels on every supported platform, TensorFlow included.

Read from the files only (no network, no uv): `uv sync --frozen` must work on Linux x86_64,
Linux aarch64 and Apple Silicon, and tensorflow-cpu has wheels only for Linux x86_64, so
the other two take plain tensorflow of the same release.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.markers import Marker
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from tests.helpers import ROOT

PROJECT = "cifar10-mlops"
TENSORFLOW_VERSION = "2.21.0"

# Each supported platform: its marker values, the wheel platform tags it accepts, and the
# TensorFlow distribution it installs. The floors (glibc 2.28, macOS 14) are the oldest systems
# the locked wheels run on: onnxruntime's arm64 macOS wheel needs 14, several Linux wheels 2.28.
PLATFORMS = {
    "linux-x86_64": {
        "env": {"sys_platform": "linux", "platform_machine": "x86_64", "platform_system": "Linux"},
        "tags": [f"manylinux_2_{g}_x86_64" for g in range(28, 4, -1)]
        + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"],
        "tensorflow": "tensorflow-cpu",
    },
    "linux-aarch64": {
        "env": {"sys_platform": "linux", "platform_machine": "aarch64", "platform_system": "Linux"},
        "tags": [f"manylinux_2_{g}_aarch64" for g in range(28, 16, -1)] + ["manylinux2014_aarch64"],
        "tensorflow": "tensorflow",
    },
    "macos-arm64": {
        "env": {"sys_platform": "darwin", "platform_machine": "arm64", "platform_system": "Darwin"},
        "tags": [f"macosx_{v}_0_{a}" for v in range(14, 10, -1) for a in ("arm64", "universal2")]
        + [f"macosx_10_{m}_universal2" for m in range(16, 8, -1)],
        "tensorflow": "tensorflow",
    },
}
PYTHON = {"python_version": "3.11", "python_full_version": "3.11.2", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "implementation_version": "3.11.2", "os_name": "posix",
          "extra": ""}


def _load(path: Path) -> dict:
    return tomllib.loads(path.read_text())


@pytest.fixture(scope="module")
def lock() -> dict:
    return _load(ROOT / "uv.lock")


def _applies(marker: str | None, platform: str) -> bool:
    return marker is None or Marker(marker).evaluate({**PYTHON, **PLATFORMS[platform]["env"]})


def _supported_tags(platform: str) -> set:
    plats = PLATFORMS[platform]["tags"]
    return set(cpython_tags((3, 11), abis=["cp311"], platforms=plats)) | set(
        compatible_tags((3, 11), "cp311", platforms=plats))


def _has_wheel(package: dict, platform: str) -> bool:
    ok = _supported_tags(platform)
    return any(set(parse_wheel_filename(w["url"].rsplit("/", 1)[1])[3]) & ok for w in package.get("wheels", []))


def _installed(lock: dict, platform: str) -> dict[str, dict]:
    """The lock's packages that `uv sync --frozen` (all groups) installs on ``platform``, by name."""
    packages = {}
    for p in lock["package"]:
        packages.setdefault(p["name"], []).append(p)

    def find(dep: dict) -> dict:
        candidates = [p for p in packages[dep["name"]] if dep.get("version") in (None, p["version"])]
        assert len(candidates) == 1, f"{dep} matches {len(candidates)} locked packages"
        return candidates[0]

    [root] = packages[PROJECT]
    todo = list(root.get("dependencies", []))
    for group in root.get("dev-dependencies", {}).values():
        todo += group
    seen: dict[str, dict] = {}
    while todo:
        dep = todo.pop()
        if not _applies(dep.get("marker"), platform):
            continue
        package = find(dep)
        extras = set(dep.get("extra", []))
        key = f"{package['name']}[{','.join(sorted(extras))}]"
        if key in seen:
            continue
        seen[key] = package
        todo += package.get("dependencies", [])
        for extra in extras:
            todo += package.get("optional-dependencies", {}).get(extra, [])
    return {p["name"]: p for p in seen.values()}


def missing_wheels(lock: dict) -> list[str]:
    """`platform: name==version` for every package some platform installs but has no wheel for."""
    return [f"{platform}: {name}=={p['version']}" for platform in PLATFORMS
            for name, p in sorted(_installed(lock, platform).items()) if not _has_wheel(p, platform)]


def test_lock_declares_the_supported_platforms_as_required(lock):
    """Without required-markers, `uv lock` would accept a package with no wheel for a platform."""
    uv = _load(ROOT / "pyproject.toml").get("tool", {}).get("uv", {})
    assert uv.get("required-environments") and uv.get("environments") == uv["required-environments"], (
        "pyproject.toml [tool.uv]: declare `environments` and the same `required-environments`, then run `uv lock`")
    for key in ("supported-markers", "required-markers"):
        markers = lock.get(key, [])
        named = {m: [p for p in PLATFORMS if _applies(m, p)] for m in markers}
        assert all(len(ps) == 1 for ps in named.values()), f"uv.lock {key}: each marker must name one platform: {named}"
        assert sorted(ps[0] for ps in named.values()) == sorted(PLATFORMS), (
            f"uv.lock {key} {markers}: want one marker per platform {sorted(PLATFORMS)}; run `uv lock`")


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_each_platform_installs_one_tensorflow_with_a_wheel(lock, platform):
    installed = _installed(lock, platform)
    tensorflows = sorted(n for n in installed if n in ("tensorflow", "tensorflow-cpu"))
    want = PLATFORMS[platform]["tensorflow"]
    assert tensorflows == [want], f"{platform} installs {tensorflows}; it must install only {want}"
    package = installed[want]
    assert package["version"] == TENSORFLOW_VERSION, f"{platform}: {want} {package['version']}, want the same release"
    assert _has_wheel(package, platform), f"uv.lock has no {want} {package['version']} wheel for {platform}"


def test_every_installed_package_has_a_wheel_on_every_platform(lock):
    assert missing_wheels(lock) == [], ("these would be built from source on `uv sync`; pin a version that "
                                        "has wheels for that platform")


def test_a_missing_wheel_is_reported():
    """The check above can fail: drop the aarch64 TensorFlow wheel and it names it."""
    lock = copy.deepcopy(_load(ROOT / "uv.lock"))
    tf = next(p for p in lock["package"] if p["name"] == "tensorflow")
    tf["wheels"] = [w for w in tf["wheels"] if "aarch64" not in w["url"]]
    assert missing_wheels(lock) == [f"linux-aarch64: tensorflow=={TENSORFLOW_VERSION}"]


def test_the_bento_installs_the_locked_serving_group_as_it_is(lock):
    """The image serves with the versions the tests ran with (tests/unit/test_deploy_files.py compares the file with
    uv.lock's `serving` group and its hashes), and BentoML does not resolve them again at build time."""
    python = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]
    assert python == {"requirements_txt": "deploy/requirements/serving.txt", "lock_packages": False}, python
    serving = (ROOT / "deploy" / "requirements" / "serving.txt").read_text()
    pins = dict(re.findall(r"^([a-z0-9._-]+)==([^ ;\\]+)", serving, re.M))
    locked = {p["name"]: p["version"] for p in lock["package"]}
    assert pins and all(locked[name] == version for name, version in pins.items())
    assert "onnxruntime" in pins and not {"tensorflow", "tensorflow-cpu", "keras", "mlflow", "apache-airflow"} & set(pins)


def test_the_image_bootstraps_the_locked_uv_by_its_hashes(lock):
    """The Bento image's install step fetches uv before anything else: that download is hash-checked too."""
    template = (ROOT / "deploy" / "containers" / "Dockerfile.template").read_text()
    [uv] = [p for p in lock["package"] if p["name"] == "uv"]
    linux = {w["hash"] for w in uv["wheels"] if "linux" in w["url"]}
    line = re.search(r"'uv==(\S+)((?: --hash=sha256:[0-9a-f]{64})+)'", template)
    assert line and line.group(1) == uv["version"]
    assert set(line.group(2).split(" --hash=")[1:]) == linux
    assert "install --no-cache-dir --disable-pip-version-check -q --require-hashes -r /tmp/uv.txt" in template
