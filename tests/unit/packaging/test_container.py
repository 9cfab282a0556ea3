"""training/packaging/container.py and base_image.py without a builder: backend choice and skip, the
base image per backend, the Dockerfile rendered for either base, the network-failure retry, the private
container configuration, the base image's cache key. The real build is tests/e2e/test_container_image.py.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.helpers import ROOT
from training.config import PipelineConfig, load_config
from training.packaging import base_image, commands, container
from training.packaging.server import NotReady



# --- backend choice -----------------------------------------------------------

def test_backend_none_skips_without_probing(monkeypatch):
    monkeypatch.setattr(container, "_healthy", lambda *a: pytest.fail("probed a backend"))
    assert container.find_backend(PipelineConfig(container_backend="none")) == (None, "container_backend=none")


def test_unknown_backend_is_rejected_with_choices():
    with pytest.raises(ValueError, match="use auto, none, docker, podman, buildah"):
        container.find_backend(PipelineConfig(container_backend="kaniko"))


def test_auto_takes_first_healthy_backend_in_order(monkeypatch):
    probed = []

    def healthy(backend, env=None):
        probed.append(backend)
        return backend == "podman", f"{backend}: {'ok' if backend == 'podman' else 'daemon not answering'}"

    monkeypatch.setattr(container, "_healthy", healthy)
    assert container.find_backend(PipelineConfig(container_backend="auto")) == ("podman", "podman: ok")
    assert probed == ["docker", "podman"]


def test_auto_with_nothing_installed_explains_each_backend(monkeypatch):
    monkeypatch.setattr(container.shutil, "which", lambda name: None)
    backend, reason = container.find_backend(PipelineConfig(container_backend="AUTO"))
    assert backend is None
    assert reason == ("no healthy container builder (docker: not installed; podman: not installed; "
                      "buildah: not installed)")


def test_docker_without_daemon_is_unhealthy(monkeypatch, tmp_path):
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    ok, reason = container._healthy("docker")
    assert not ok and "Cannot connect to the Docker daemon" in reason


def test_containerize_skips_with_reason_when_no_backend(monkeypatch, tmp_path, caplog):
    config = PipelineConfig(state_dir=str(tmp_path), container_backend="none")
    with caplog.at_level("WARNING"):
        assert container.containerize(config, "cifar10-classifier:abc") is None
    assert "skipping containerize: container_backend=none" in caplog.text
    assert "bentoml serve" in caplog.text


# --- base image per backend ----------------------------------------------------

LOCAL_BASE = base_image.BASE_IMAGE
REGISTRY_BASE = container.REGISTRY_BASE_IMAGE


@pytest.mark.parametrize("backend, base", [("docker", REGISTRY_BASE), ("podman", LOCAL_BASE),
                                           ("buildah", LOCAL_BASE)])
def test_base_image_follows_the_backend_unless_overridden(backend, base):
    assert container.choose_base_image(backend) == base
    assert container.choose_base_image(backend, "  ") == base
    assert container.choose_base_image(backend, " registry.example/py:3.11 ") == "registry.example/py:3.11"


def test_registry_base_is_the_slim_python_of_the_local_base_release():
    name, _, digest = REGISTRY_BASE.partition("@")
    assert name == "docker.io/library/python:3.11-slim-bookworm" and re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert name.endswith(f"-{base_image.RECIPE['suite']}") and LOCAL_BASE.endswith(base_image.RECIPE["suite"])


def test_unknown_backend_has_no_base_image():
    with pytest.raises(ValueError, match="no base image for backend 'kaniko'; use one of docker, podman, buildah"):
        container.choose_base_image("kaniko")


def test_base_image_setting_comes_from_the_environment_and_params_win():
    assert load_config({}, environ={"CIFAR10_BASE_IMAGE": "from-env:1"}).base_image == "from-env:1"
    assert load_config({"base_image": "from-param:1"}, environ={"CIFAR10_BASE_IMAGE": "from-env:1"}).base_image \
        == "from-param:1"
    assert load_config({}, environ={}).base_image == ""


BENTO_LABELS = {"mlflow_model": "cifar10-cnn", "mlflow_version": "7", "mlflow_run_id": "run0123",
                "bentoml_model": "cifar10-cnn:m1"}
MODEL_METADATA = {"git_commit": "abc1234def", "dataset_digest": "sha256:feedface", "test_accuracy": 0.5}


class _Tag(SimpleNamespace):
    def __str__(self):
        return f"{self.name}:{self.version}"


def _bento(labels=BENTO_LABELS, models=()):
    return SimpleNamespace(tag=_Tag(name="cifar10-classifier", version="v1"),
                           info=SimpleNamespace(labels=dict(labels), models=list(models)))


def _model(tag="cifar10-cnn:m1", metadata=MODEL_METADATA):
    return SimpleNamespace(tag=tag, info=SimpleNamespace(metadata=dict(metadata)))


class _FakeBentoml:
    """Just enough of bentoml for containerize: one Bento, exported as an empty folder, and its model."""

    def __init__(self):
        self.bentos = SimpleNamespace(get=lambda name: _bento(),
                                      export_bento=lambda tag, path, output_format: Path(path).mkdir(parents=True))
        self.models = SimpleNamespace(get=lambda tag: _model(tag))


@pytest.mark.parametrize("backend, override, base, importer", [
    ("docker", None, REGISTRY_BASE, None),
    ("podman", None, LOCAL_BASE, ["podman"]),
    ("buildah", None, LOCAL_BASE, ["podman"]),
    ("docker", LOCAL_BASE, LOCAL_BASE, ["docker"]),  # the local base, built into docker's store
    ("podman", REGISTRY_BASE, REGISTRY_BASE, None),
])
def test_containerize_builds_on_the_chosen_base(monkeypatch, tmp_path, backend, override, base, importer):
    import training.packaging.bento

    built, commands = [], []
    monkeypatch.setattr(container, "find_backend", lambda config, env=None: (backend, f"{backend}: ok"))
    monkeypatch.setattr(training.packaging.bento, "use_bentoml_home", lambda config: _FakeBentoml())
    monkeypatch.setattr(base_image, "ensure_base_image", lambda cli, env, work, image=LOCAL_BASE: built.append(cli))
    monkeypatch.setattr(container, "run_with_network_retry", lambda cmd, **kw: commands.append(cmd))
    monkeypatch.setattr(container, "image_size", lambda *a: 1)
    monkeypatch.delenv("CIFAR10_BASE_IMAGE", raising=False)
    config = PipelineConfig(state_dir=str(tmp_path))
    assert container.containerize(config, "cifar10-classifier:v1", override) == "cifar10-classifier:v1"
    assert built == ([importer] if importer else [])
    [cmd] = commands
    assert cmd[0] == ("buildah" if backend == "buildah" else backend)
    assert cmd[cmd.index("--build-arg") + 1] == f"BASE_IMAGE={base}"
    # Only the version tag: `latest` moves after the served-artifact check (tag_image).
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "-t"] == ["cifar10-classifier:v1"]
    labels = dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "--label")
    assert labels == {
        "org.opencontainers.image.title": "cifar10-classifier", "org.opencontainers.image.version": "v1",
        "org.opencontainers.image.revision": "abc1234def", "ai.cifar10.bento.tag": "cifar10-classifier:v1",
        "ai.cifar10.bentoml.model": "cifar10-cnn:m1", "ai.cifar10.mlflow.model": "cifar10-cnn",
        "ai.cifar10.mlflow.version": "7", "ai.cifar10.mlflow.run_id": "run0123",
        "ai.cifar10.dataset.digest": "sha256:feedface"}


def test_labels_without_a_known_commit_say_unknown():
    labels = container.image_labels(_bento(), _model(metadata={}))
    assert labels["org.opencontainers.image.revision"] == "unknown" and labels["ai.cifar10.dataset.digest"] == ""


def test_the_bentos_model_comes_from_its_label_else_its_one_packed_model():
    from training.packaging.bento import bento_model_tag

    assert bento_model_tag(_bento()) == "cifar10-cnn:m1"
    assert bento_model_tag(_bento(labels={}, models=[SimpleNamespace(tag="cifar10-cnn:packed")])) == "cifar10-cnn:packed"
    with pytest.raises(ValueError, match="no bentoml_model label and 0 models"):
        bento_model_tag(_bento(labels={}))


def test_containerize_takes_the_base_from_the_environment(monkeypatch, tmp_path):
    import training.packaging.bento

    commands = []
    monkeypatch.setattr(container, "find_backend", lambda config, env=None: ("docker", "docker: ok"))
    monkeypatch.setattr(training.packaging.bento, "use_bentoml_home", lambda config: _FakeBentoml())
    monkeypatch.setattr(container, "run_with_network_retry", lambda cmd, **kw: commands.append(cmd))
    monkeypatch.setattr(container, "image_size", lambda *a: 1)
    mirror = "mirror.example/python:3.11-slim-bookworm"
    config = load_config({"state_dir": str(tmp_path)},
                         environ={"CIFAR10_BASE_IMAGE": mirror, "CIFAR10_ALLOWED_BASE_IMAGES": f"other:1, {mirror}"})
    container.containerize(config, "cifar10-classifier:v1")
    assert f"BASE_IMAGE={mirror}" in commands[0]
    # The same base without the operator's allowlist is refused before anything is built.
    with pytest.raises(ValueError, match="is neither allowed nor pinned by digest"):
        container.containerize(config.replace(allowed_base_images=""), "cifar10-classifier:v1")
    assert len(commands) == 1


DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize("image", ["", REGISTRY_BASE, LOCAL_BASE, f"evil.example/python@{DIGEST}",
                                   f"docker.io/library/python:3.11-slim-bookworm@{DIGEST}", "listed.example/py:1"])
def test_a_base_image_is_a_default_listed_or_pinned_by_digest(image):
    container.check_base_image(image, PipelineConfig(allowed_base_images="listed.example/py:1,x:2"))


@pytest.mark.parametrize("image", ["evil.example/python:3.11", "python:3.11-slim-bookworm", "listed.example/py:2",
                                   f"evil.example/python@{DIGEST[:-1]}", f"evil.example/python@sha256:{'G' * 64}",
                                   "evil.example/python:latest@md5:0123"])
def test_any_other_base_image_is_refused_naming_what_is_allowed(image):
    with pytest.raises(ValueError, match=rf"base image '{re.escape(image)}' is neither allowed nor pinned by digest: "
                                         r"name it as IMAGE@sha256:<64 hex digits>, or have the operator add it to "
                                         r"CIFAR10_ALLOWED_BASE_IMAGES \(allowed now: .*listed\.example/py:1"):
        container.check_base_image(image, PipelineConfig(allowed_base_images="listed.example/py:1"))


def test_registry_pull_failure_says_how_to_use_the_local_base(monkeypatch, tmp_path):
    import training.packaging.bento

    def offline(cmd, **kw):
        raise commands.NetworkBuildError("building failed twice because of the NETWORK")

    monkeypatch.setattr(container, "find_backend", lambda config, env=None: ("docker", "docker: ok"))
    monkeypatch.setattr(training.packaging.bento, "use_bentoml_home", lambda config: _FakeBentoml())
    monkeypatch.setattr(container, "run_with_network_retry", offline)
    with pytest.raises(commands.NetworkBuildError, match=f"set CIFAR10_BASE_IMAGE={re.escape(LOCAL_BASE)}"):
        container.containerize(PipelineConfig(state_dir=str(tmp_path)), "cifar10-classifier:v1", "")


# --- the Dockerfile, rendered as BentoML renders it at Bento build time ----------

@pytest.fixture(scope="module")
def dockerfile(tmp_path_factory) -> str:
    from bentoml._internal.bento.build_config import CondaOptions, DockerOptions
    from bentoml._internal.container.generate import generate_containerfile

    bento_fs = tmp_path_factory.mktemp("bento")
    (bento_fs / "env" / "python").mkdir(parents=True)
    (bento_fs / "env" / "python" / "requirements.txt").write_text("numpy==2.4.6\n")
    docker = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["docker"]
    return generate_containerfile(DockerOptions(**docker).with_defaults(), str(ROOT), conda=CondaOptions(),
                                  bento_fs=bento_fs, enable_buildkit=False)


def _instructions(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_builds_from_the_base_image_build_argument(dockerfile):
    steps = _instructions(dockerfile)
    froms = [i for i, s in enumerate(steps) if s.startswith("FROM ")]
    assert len(froms) == 1 and steps[froms[0]] == "FROM ${BASE_IMAGE} AS base-container"
    # A global ARG before FROM: docker, podman and buildah all substitute --build-arg BASE_IMAGE=... there,
    # and without one the Bento's default applies (what `bentoml containerize` uses).
    assert steps[froms[0] - 1] == f"ARG BASE_IMAGE={REGISTRY_BASE}"
    assert container.BASE_IMAGE_ARG == "BASE_IMAGE"


def test_bentofile_default_base_is_the_registry_one():
    docker = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["docker"]
    assert docker["base_image"] == REGISTRY_BASE
    assert docker["dockerfile_template"] == "deploy/containers/Dockerfile.template"


def test_dockerfile_assumes_no_interpreter_path(dockerfile):
    """python:slim has Python in /usr/local/bin, Debian in /usr/bin: the install step looks it up."""
    assert not re.search(r"/usr(/local)?/bin/python", dockerfile)
    assert 'PY=$(command -v python3.11)' in dockerfile and '--python "$PY"' in dockerfile
    # python:slim ships pip (and setuptools); the image must not keep an installer either way.
    assert '"$PY" -m pip uninstall' in dockerfile


def _interpreter_lookup(dockerfile: str) -> str:
    """The install step's interpreter lookup, as a shell snippet that prints what it found."""
    run = next(s for s in _instructions(dockerfile) if s.startswith("RUN set -eu;"))
    lookup = re.search(r"PY=\$\(command -v python3\.11\) \|\| \{[^}]*\}", run).group(0)
    return f"set -eu; {lookup}; echo \"$PY\""


# PATH as each base image sets it: the local recipe's, and the official python image's.
BASE_LAYOUTS = {
    LOCAL_BASE: (base_image.RECIPE["env"]["PATH"], "usr/bin"),
    REGISTRY_BASE: ("/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "usr/local/bin"),
}


@pytest.mark.parametrize("base", [LOCAL_BASE, REGISTRY_BASE])
def test_install_step_finds_python_on_either_base(dockerfile, tmp_path, base):
    path, python_dir = BASE_LAYOUTS[base]
    (tmp_path / python_dir).mkdir(parents=True)
    fake = tmp_path / python_dir / "python3.11"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    rooted = ":".join(str(tmp_path) + d for d in path.split(":"))
    out = subprocess.run(["/bin/sh", "-c", _interpreter_lookup(dockerfile)], env={"PATH": rooted},
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(fake), out.stderr


def test_install_step_without_python311_says_what_is_wrong(dockerfile, tmp_path):
    out = subprocess.run(["/bin/sh", "-c", _interpreter_lookup(dockerfile)], env={"PATH": str(tmp_path)},
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "no python3.11 on PATH" in out.stderr and "BASE_IMAGE" in out.stderr


# --- network failures ---------------------------------------------------------

UV_OFFLINE = """STEP 7/12: RUN set -eu; ...
error: Failed to fetch: `https://pypi.org/simple/aiohttp/`
  Caused by: Request failed after 3 retries
  Caused by: error sending request for url (https://pypi.org/simple/aiohttp/)
  Caused by: dns error: failed to lookup address information: Temporary failure in name resolution
Error: building at STEP "RUN set -eu": exit status 2"""
DEBOOTSTRAP_OFFLINE = "I: Retrieving InRelease\nE: Failed getting release file http://deb.debian.org/debian/dists/bookworm/Release"
DOCKER_PULL_OFFLINE = ("ERROR: failed to solve: docker.io/library/python:3.11-slim-bookworm: failed to resolve source "
                       "metadata: Get \"https://registry-1.docker.io/v2/\": dial tcp: lookup registry-1.docker.io: "
                       "no such host")
RECIPE_ERROR = """STEP 7/12: RUN set -eu; ...
  x No solution found when resolving dependencies:
  Because there is no version of onnxruntime==0.0.1 and you require onnxruntime==0.0.1, we can conclude that
  your requirements are unsatisfiable.
Error: building at STEP "RUN set -eu": exit status 1"""


@pytest.mark.parametrize("output, network", [(UV_OFFLINE, True), (DEBOOTSTRAP_OFFLINE, True),
                                             (DOCKER_PULL_OFFLINE, True), (RECIPE_ERROR, False), ("", False)])
def test_network_failures_are_recognised(output, network):
    assert commands.is_network_failure(output) is network


def _runner(outputs):
    """A fake subprocess.run: each call writes the next (exit code, output) to stdout."""
    calls = []

    def run(cmd, env, stdout, stderr):
        code, text = outputs[len(calls)]
        calls.append(cmd)
        stdout.write(text)
        return subprocess.CompletedProcess(cmd, code)

    return run, calls


def test_network_failure_is_retried_once_then_named(tmp_path):
    run, calls = _runner([(2, UV_OFFLINE), (2, UV_OFFLINE)])
    retried = []
    with pytest.raises(commands.NetworkBuildError, match="failed twice because of the NETWORK") as err:
        commands.run_with_network_retry(["build"], env={}, log_path=tmp_path / "b.log", what="building X",
                                         before_retry=lambda: retried.append(1), runner=run)
    assert len(calls) == 2 and retried == [1]
    assert "Temporary failure in name resolution" in str(err.value) and str(tmp_path / "b.log") in str(err.value)


def test_network_blip_then_success_passes(tmp_path):
    run, calls = _runner([(2, UV_OFFLINE), (0, "ok")])
    commands.run_with_network_retry(["build"], env={}, log_path=tmp_path / "b.log", what="x", runner=run)
    assert len(calls) == 2


def test_other_failures_are_not_retried(tmp_path):
    run, calls = _runner([(1, RECIPE_ERROR)])
    with pytest.raises(commands.ContainerBuildError, match="building X failed \\(exit 1\\)") as err:
        commands.run_with_network_retry(["build"], env={}, log_path=tmp_path / "b.log", what="building X",
                                         runner=run)
    assert not isinstance(err.value, commands.NetworkBuildError)
    assert len(calls) == 1 and "unsatisfiable" in str(err.value)


# --- private configuration and build command -----------------------------------

def test_container_env_points_podman_into_the_state_dir(tmp_path):
    env = container.container_env(PipelineConfig(state_dir=str(tmp_path)), base={"PATH": "/usr/bin"})
    conf, storage = Path(env["CONTAINERS_CONF"]), Path(env["CONTAINERS_STORAGE_CONF"])
    assert conf.parent == storage.parent == tmp_path / "containers" / "conf"
    text = conf.read_text() + storage.read_text()
    assert "@" not in text.replace("# ", "")  # every placeholder rendered
    assert f'graphroot = "{tmp_path}/containers/storage"' in text
    assert 'runtime = "runc"' in text and "nofile=20000:20000" in text
    assert env["PATH"] == "/usr/bin"


@pytest.mark.parametrize("backend, head", [("podman", ["podman", "build"]), ("buildah", ["buildah", "bud"]),
                                           ("docker", ["docker", "build"])])
def test_build_command(backend, head):
    cmd = container.build_command(backend, "/ctx/env/docker/Dockerfile", "/ctx", ["img:v1", "img:latest"])
    assert cmd[:2] == head and cmd[-1] == "/ctx"
    assert cmd[cmd.index("--network") + 1] == "host" and cmd[cmd.index("-f") + 1] == "/ctx/env/docker/Dockerfile"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "-t"] == ["img:v1", "img:latest"]
    # docker build has no --volume; podman/buildah mount the host CA bundle read-only while installing
    assert any(a.endswith(f":{container.BUILD_CA_MOUNT}:ro") for a in cmd) is (backend != "docker")
    assert "--build-arg" not in cmd and "--label" not in cmd
    with_base = container.build_command(backend, "/ctx/Dockerfile", "/ctx", ["img:v1"], {"BASE_IMAGE": "b:1"})
    assert with_base[with_base.index("--build-arg") + 1] == "BASE_IMAGE=b:1" and with_base[-1] == "/ctx"
    labelled = container.build_command(backend, "/ctx/Dockerfile", "/ctx", ["img:v1"],
                                       labels={"org.opencontainers.image.revision": "abc", "a.b": "x=y z"})
    assert [labelled[i + 1] for i, a in enumerate(labelled) if a == "--label"] == [
        "org.opencontainers.image.revision=abc", "a.b=x=y z"]
    assert labelled[-1] == "/ctx"


# --- base image recipe ----------------------------------------------------------

def test_recipe_hash_is_stable_and_tracks_content():
    assert base_image.recipe_hash() == base_image.recipe_hash(json.loads(json.dumps(base_image.RECIPE)))
    changed = {**base_image.RECIPE, "include": [*base_image.RECIPE["include"], "gcc"]}
    assert base_image.recipe_hash(changed) != base_image.recipe_hash()


def test_base_recipe_has_no_compiler_and_python_311():
    assert not {"gcc", "build-essential", "g++", "python3-dev"} & set(base_image.RECIPE["include"])
    # bookworm's python3 is 3.11, the version the install step looks for.
    assert base_image.RECIPE["suite"] == "bookworm" and "python3" in base_image.RECIPE["include"]


def test_debian_mirror_comes_from_the_host_sources(tmp_path):
    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n")
    assert base_image.debian_mirror(sources, tmp_path / "none") == "http://mirror.example/debian"
    legacy = tmp_path / "sources.list"
    legacy.write_text("deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert base_image.debian_mirror(tmp_path / "none", legacy) == "http://other.example/debian"
    assert base_image.debian_mirror(tmp_path / "none", tmp_path / "none") == base_image.DEFAULT_MIRROR


def test_the_base_gets_the_security_suite_from_the_hosts_security_mirror(tmp_path):
    """debootstrap installs bookworm as released; the base is upgraded to bookworm-security and keeps it in its sources."""
    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\n"
                       "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n")
    mirrors = {archive: base_image.debian_mirror(sources, tmp_path / "none", archive)
               for archive in base_image.RECIPE["updates"]}
    assert mirrors == {"debian": "http://mirror.example/debian", "debian-security": "http://security.example/debian-security"}
    assert base_image.debian_mirror(tmp_path / "none", tmp_path / "none", "debian-security") == \
        "http://deb.debian.org/debian-security"
    stanzas = [dict(line.split(": ", 1) for line in stanza.splitlines())
               for stanza in base_image.apt_sources(mirrors).split("\n\n")]
    assert [(s["URIs"], s["Suites"]) for s in stanzas] == [
        ("http://mirror.example/debian", "bookworm bookworm-updates"),
        ("http://security.example/debian-security", "bookworm-security")]
    assert all(s["Signed-By"] == "/usr/share/keyrings/debian-archive-keyring.gpg" for s in stanzas)


def test_a_base_older_than_a_week_is_rebuilt_for_its_security_fixes():
    want, now = base_image.recipe_hash(), datetime.datetime(2026, 12, 5, tzinfo=datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    assert base_image.rebuild_reason((want, (now - 2 * day).isoformat()), want, now) is None
    assert "8 days ago" in base_image.rebuild_reason((want, (now - 8 * day).isoformat()), want, now)
    assert "recipe old" in base_image.rebuild_reason(("old", now.isoformat()), want, now)
    assert base_image.rebuild_reason((want, ""), want, now) == "its build time is unknown"  # built by an older recipe
    assert base_image.rebuild_reason(None, want, now) == "no base image stored"


# --- tagging and running built images (a fake podman on PATH) --------------------

FAKE_PODMAN = """#!/bin/sh
echo "$@" >> "$FAKE_LOG"
case "$1 $2" in
  "image exists") [ "$3" = "$FAKE_HAVE" ] ;;
  "run -d") echo 0123abcd ;;
  "inspect --format") echo "$FAKE_RUNNING" ;;
  "logs --tail") echo "Traceback: the model failed to load" ;;
esac
"""


@pytest.fixture()
def fake_podman(monkeypatch, tmp_path):
    """A podman that records its calls; ``image exists`` is true for FAKE_HAVE only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "podman").write_text(FAKE_PODMAN)
    (bin_dir / "podman").chmod(0o755)
    log = tmp_path / "podman.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_HAVE", "cifar10-classifier:v1")
    monkeypatch.setenv("FAKE_RUNNING", "true")
    monkeypatch.setattr(container, "find_backend", lambda config, env=None: ("podman", "podman: ok"))
    config = PipelineConfig(state_dir=str(tmp_path / "state"))
    return config, lambda: log.read_text().splitlines() if log.exists() else []


def test_tag_image_moves_a_tag_onto_the_bentos_image(fake_podman, caplog):
    config, calls = fake_podman
    assert container.image_exists(config, "cifar10-classifier:v1")
    assert not container.image_exists(config, "cifar10-classifier:v2")
    assert container.tag_image(config, "cifar10-classifier:v1") == "cifar10-classifier:latest"
    assert container.tag_image(config, "cifar10-classifier:v1", tag="stable") == "cifar10-classifier:stable"
    assert [c for c in calls() if c.startswith("tag ")] == [
        "tag cifar10-classifier:v1 cifar10-classifier:latest", "tag cifar10-classifier:v1 cifar10-classifier:stable"]
    with caplog.at_level("WARNING"):
        assert container.tag_image(config, "cifar10-classifier:v2") is None
    assert "has no image cifar10-classifier:v2 (containerize skipped or failed for it)" in caplog.text
    assert not [c for c in calls() if "v2 cifar10" in c]


def test_tag_image_without_a_builder_says_why(monkeypatch, tmp_path, caplog):
    config = PipelineConfig(state_dir=str(tmp_path), container_backend="none")
    with caplog.at_level("WARNING"):
        assert container.tag_image(config, "cifar10-classifier:v1") is None
    assert "not tagging an image for cifar10-classifier:v1 as latest: container_backend=none" in caplog.text
    assert container.image_exists(config, "cifar10-classifier:v1") is False


def _readyz_server(status: int = 200):
    from http.server import BaseHTTPRequestHandler, HTTPServer
    import threading

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_serve_image_yields_the_url_once_ready_and_removes_the_container(fake_podman):
    config, calls = fake_podman
    server = _readyz_server()
    port = server.server_address[1]
    try:
        with container.serve_image(config, "cifar10-classifier:v1", port, name="c1") as url:
            assert url == f"http://127.0.0.1:{port}"
            assert (f"run -d --name c1 --read-only --cap-drop=ALL --security-opt=no-new-privileges "
                    "--read-only-tmpfs=false --tmpfs /tmp:rw,nosuid,nodev,mode=1777 --tmpfs "
                    "/home/bentoml/prometheus_multiproc_dir:rw,nosuid,nodev,mode=1777 "
                    f"-p 127.0.0.1:{port}:3000 cifar10-classifier:v1") in calls()
            assert not [c for c in calls() if c.startswith("rm ")]
    finally:
        server.shutdown()
    assert calls()[-1] == "rm -f -t 0 c1"


def test_serve_image_timeout_names_the_url_and_shows_the_log_tail(fake_podman):
    from tests.helpers import free_port

    config, calls = fake_podman
    port = free_port()
    with pytest.raises(NotReady, match=f"http://127.0.0.1:{port}/readyz did not answer 200 within 1 s") as err:
        with container.serve_image(config, "cifar10-classifier:v1", port, timeout=1, name="c2"):
            pytest.fail("yielded without /readyz")
    assert "Traceback: the model failed to load" in str(err.value)
    assert calls()[-1] == "rm -f -t 0 c2"


def test_serve_image_stops_waiting_when_the_container_exits(fake_podman, monkeypatch):
    from tests.helpers import free_port

    config, calls = fake_podman
    monkeypatch.setenv("FAKE_RUNNING", "false")
    with pytest.raises(NotReady, match="the service exited before it was ready; its log ends:\nTraceback"):
        with container.serve_image(config, "cifar10-classifier:v1", free_port(), timeout=60, name="c3"):
            pass
    assert calls()[-1] == "rm -f -t 0 c3"


def test_serve_image_needs_a_runtime(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match="cannot run img:v1: container_backend=none; install podman"):
        with container.serve_image(PipelineConfig(state_dir=str(tmp_path), container_backend="none"), "img:v1", 1):
            pass
    monkeypatch.setattr(container, "find_backend", lambda config, env=None: ("buildah", "buildah: ok"))
    monkeypatch.setattr(container.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="buildah builds images but cannot run them"):
        with container.serve_image(PipelineConfig(state_dir=str(tmp_path)), "img:v1", 1):
            pass
