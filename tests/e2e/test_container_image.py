"""The Bento's image for real: the DAG on a tiny generated dataset with podman, so its containerize task
builds the image; then the image runs under podman (``container.serve_image``, confined as
deploy/k8s/bento.yaml runs it: read-only root filesystem, its non-root user, no capabilities) and
answers over HTTP, its labels and answer headers name what it serves, it holds exactly uv.lock's
serving versions, and ``container.tag_image`` moves a tag onto it.
Every container and image it made is removed afterwards (the whole private store).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time

import pytest

from tests.helpers import ROOT, free_port, image_folder_zip, require, run_dag, state_env
from training.config import PipelineConfig
from training.packaging import base_image, commands, container


def _png(color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "PNG")
    return buf.getvalue()


CONTAINER_TOOLS = ("podman", "buildah", "runc", "debootstrap")


def _task_log(dag_log: str, task_id: str) -> str:
    """The part of an `airflow dags test` log written by ``task_id``'s last try ("" if it never ran)."""
    start = dag_log.rfind(f"starting task_id={task_id}")
    if start < 0:
        return ""
    end = dag_log.find(f"end task task_id={task_id}", start)
    return dag_log[start:end if end >= 0 else None]


@pytest.fixture(scope="module")
def built_image(tmp_path_factory):
    """Run the DAG with a real builder on a tiny dataset; yield (image, env, state)."""
    missing = [t for t in CONTAINER_TOOLS if shutil.which(t) is None]
    require(not missing, f"missing {', '.join(missing)}: run .ci/setup-container-tools.sh")
    state = tmp_path_factory.mktemp("container-state")
    archive = image_folder_zip(state / "syn.zip", per_class=12)
    config = PipelineConfig(state_dir=str(state))
    env = state_env(state, CIFAR10_WIDTHS="8,16", CIFAR10_CONTAINER_BACKEND="podman")
    log = state / "dag.log"
    dag = run_dag(env, {"data_url": archive.as_uri(), "epochs": 1, "force_promote": True}, log)
    text = log.read_text()
    assert dag.returncode == 0, text[-4000:]
    # The containerize task (its last try) must have built the image, not skipped.
    task = _task_log(text, "containerize")
    assert "new_state=success" in task, task[-4000:]
    cenv = container.container_env(config, base=env)
    images = subprocess.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"], env=cenv,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    ids = {line.split()[0].removeprefix("localhost/"): line.split()[1] for line in images if "cifar10-classifier" in line}
    image = next(i for i in ids if not i.endswith(":latest"))
    # force_promote: the run must promote, and promotion (tag_image, after the served-artifact check)
    # moves `latest` onto this image; containerize itself tags the Bento's version only.
    promote = _task_log(text, "promote")
    assert "new_state=success" in promote, f"force_promote=True but the promote task did not succeed:\n{promote[-4000:]}"
    assert ids.get("cifar10-classifier:latest") == ids[image], f"`latest` is not {image} after its promotion: {ids}"
    try:
        yield image, cenv, state
    finally:
        # Everything the test made lives in the private store: reset it, then delete it.
        subprocess.run(["podman", "rm", "--all", "--force", "-t", "0"], env=cenv, capture_output=True)
        subprocess.run(["podman", "system", "reset", "--force"], env=cenv, capture_output=True)
        shutil.rmtree(state / "containers", ignore_errors=True)


@pytest.fixture()
def running(built_image):
    """The image running under podman on a free port (``container.serve_image``); removed afterwards."""
    image, env, state = built_image
    port = free_port()
    name = f"cifar10-test-{port}"
    started = time.monotonic()
    with container.serve_image(PipelineConfig(state_dir=str(state), container_backend="podman"), image, port,
                               name=name) as url:
        print(f"{image}: /readyz 200 after {time.monotonic() - started:.1f} s (load {os.getloadavg()[0]:.1f})")
        yield url, name
    left = subprocess.run(["podman", "ps", "-a", "-q", "--filter", f"name={name}"], env=env,
                          capture_output=True, text=True).stdout.strip()
    assert left == "", f"container {name} left behind"


@pytest.mark.container
def test_image_serves_predictions_readyz_metrics_and_errors(built_image, running):
    import requests

    image, env, _ = built_image
    url, name = running
    resp = requests.post(f"{url}/predict", files={"file": ("red.png", _png(), "image/png")}, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["label"] in body["probabilities"] and len(body["probabilities"]) == 10
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-3
    bad = requests.post(f"{url}/predict", files={"file": ("x.png", b"not an image", "image/png")}, timeout=30)
    assert bad.status_code == 400, bad.text
    metrics = requests.get(f"{url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "bentoml_service_request" in metrics.text
    who = subprocess.run(["podman", "exec", name, "id", "-u"], env=env, capture_output=True, text=True, check=True)
    assert who.stdout.strip() != "0", "the image must not run as root"


def _in_container(env: dict[str, str], name: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", "exec", name, "python", "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.container
def test_image_serves_read_only_as_its_non_root_user_without_capabilities(built_image, running):
    """As deploy/k8s/bento.yaml runs it: only its emptyDir paths writable, runAsUser, capabilities dropped,
    no new privileges; and it still answers."""
    import requests
    import yaml

    _, env, _ = built_image
    url, name = running
    pod = next(d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "bento.yaml").read_text())
               if d and d["kind"] == "Deployment")["spec"]["template"]["spec"]
    writable = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
    assert sorted(writable) == sorted(container.WRITABLE_PATHS)
    inspect = subprocess.run(["podman", "inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", name], env=env,
                             capture_output=True, text=True, check=True)
    assert inspect.stdout.strip() == "true"
    status = dict(line.split(":\t", 1) for line in _in_container(
        env, name, "print(open('/proc/self/status').read())").stdout.splitlines() if ":\t" in line)
    assert status["Uid"].split()[0] == str(pod["securityContext"]["runAsUser"])  # the image's own user, 1034
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0 and status["NoNewPrivs"].strip() == "1"
    probe = ("import sys\nfor path in sys.argv[1:]:\n    try:\n        open(path + '/probe', 'w').close(); print(path, 'ok')\n"
             "    except OSError as e:\n        print(path, e.strerror)")
    paths = [*writable, "/home/bentoml", "/home/bentoml/bento", "/app/.venv", "/etc"]
    wrote = subprocess.run(["podman", "exec", name, "python", "-c", probe, *paths], env=env, capture_output=True,
                           text=True, timeout=60).stdout.splitlines()
    assert wrote == [f"{p} ok" for p in writable] + [f"{p} Read-only file system" for p in paths[len(writable):]]
    resp = requests.post(f"{url}/predict", files={"file": ("red.png", _png(), "image/png")}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert requests.get(f"{url}/metrics", timeout=10).status_code == 200  # its metric files are writable


@pytest.mark.container
def test_image_holds_exactly_the_locked_serving_versions(built_image):
    """deploy/requirements/serving.txt (uv.lock's serving group, hash-checked at build) is what is installed:
    nothing re-resolved, nothing more."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    image, env, _ = built_image
    entries = re.findall(r"^([a-z0-9][^\\\n]*?)\s*\\?$", (ROOT / "deploy" / "requirements" / "serving.txt").read_text(),
                         re.M)
    locked = {canonicalize_name(r.name): str(r.specifier).removeprefix("==")
              for r in map(Requirement, entries) if r.marker is None or r.marker.evaluate()}
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    out = subprocess.run(["podman", "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", code],
                         env=env, capture_output=True, text=True, check=True, timeout=120)
    installed = {canonicalize_name(n): v for n, v in json.loads(out.stdout).items()}
    assert installed == locked, {"missing": locked.keys() - installed.keys(), "extra": installed.keys() - locked.keys(),
                                 "other": {n: (v, locked[n]) for n, v in installed.items() if locked.get(n, v) != v}}


def _labels(image: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["podman", "image", "inspect", "--format", "{{json .Labels}}", image], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.container
def test_image_labels_and_answer_headers_name_what_it_serves(built_image, running):
    import requests

    image, env, _ = built_image
    url, _ = running
    meta = requests.post(f"{url}/metadata", timeout=30).json()
    labels = _labels(image, env)
    version = image.rsplit(":", 1)[1]
    assert meta["bento_tag"] == f"cifar10-classifier:{version}"  # served from the Bento, not from source
    assert {k: v for k, v in labels.items() if k.startswith(("org.opencontainers.", "ai.cifar10."))} == {
        "org.opencontainers.image.title": "cifar10-classifier", "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": meta["git_commit"], "ai.cifar10.bento.tag": meta["bento_tag"],
        "ai.cifar10.bentoml.model": meta["bentoml_model_tag"], "ai.cifar10.mlflow.model": meta["mlflow_model"],
        "ai.cifar10.mlflow.version": meta["mlflow_version"], "ai.cifar10.mlflow.run_id": meta["mlflow_run_id"],
        "ai.cifar10.dataset.digest": meta["dataset_digest"], "ai.cifar10.precision": labels["ai.cifar10.precision"]}
    assert labels["ai.cifar10.precision"].startswith("auto: ")  # the run's default setting, with int8's record
    served = requests.post(f"{url}/predict", timeout=30, files={"file": ("red.png", _png(), "image/png")})
    assert served.headers["X-Model-Precision"] == meta["precision"]["served"]  # the file it says it runs
    # The DAG ran in this checkout: the revision is its commit, the digest the generated dataset's.
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", labels["org.opencontainers.image.revision"]), labels
    assert labels["ai.cifar10.dataset.digest"] and labels["ai.cifar10.mlflow.run_id"]
    for route, field in (("/predict", "file"), ("/predict_batch", "files")):
        resp = requests.post(f"{url}{route}", files=[(field, ("red.png", _png(), "image/png"))], timeout=30)
        assert resp.status_code == 200, resp.text
        assert {h: resp.headers[h] for h in ("X-Bento-Tag", "X-BentoML-Model", "X-MLflow-Model",
                                             "X-MLflow-Model-Version", "X-MLflow-Run-Id")} == {
            "X-Bento-Tag": labels["ai.cifar10.bento.tag"], "X-BentoML-Model": labels["ai.cifar10.bentoml.model"],
            "X-MLflow-Model": labels["ai.cifar10.mlflow.model"],
            "X-MLflow-Model-Version": labels["ai.cifar10.mlflow.version"],
            "X-MLflow-Run-Id": labels["ai.cifar10.mlflow.run_id"]}, route


@pytest.mark.container
def test_tag_image_moves_a_tag_onto_the_built_image(built_image):
    image, env, state = built_image
    config = PipelineConfig(state_dir=str(state), container_backend="podman")
    bento_tag = _labels(image, env)["ai.cifar10.bento.tag"]
    assert container.image_exists(config, image)
    assert not container.image_exists(config, "cifar10-classifier:e2e-moved")
    assert container.tag_image(config, bento_tag, "e2e-moved") == "cifar10-classifier:e2e-moved"
    assert container.image_exists(config, "cifar10-classifier:e2e-moved")
    ids = [subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", i], env=env, capture_output=True,
                          text=True, check=True).stdout.strip() for i in (image, "cifar10-classifier:e2e-moved")]
    assert ids[0] == ids[1]
    assert container.tag_image(config, "cifar10-classifier:never-built", "e2e-moved") is None


@pytest.mark.container
def test_image_is_lean_and_needs_no_network(built_image):
    image, env, _ = built_image
    size = container.image_size("podman", image, env)
    assert size <= 600e6, f"image is {size / 1e6:.0f} MB (limit 600 MB)"
    # No compiler, apt lists or training stack inside; the model is.
    probe = ("import importlib.util as u, os, shutil, glob; "
             "print([m for m in ('tensorflow', 'airflow', 'mlflow', 'keras') if u.find_spec(m)], "
             "[c for c in ('gcc', 'cc', 'g++', 'uv', 'pip') if shutil.which(c)], "
             "len(os.listdir('/var/lib/apt/lists')), len(glob.glob('/home/bentoml/bento/models/*/*/model.onnx')))")
    out = subprocess.run(["podman", "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", probe],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] [] 0 1", out
    # Served with no network at all: /readyz answers from inside the container.
    name = f"cifar10-offline-{os.getpid()}"
    subprocess.run(["podman", "run", "-d", "--name", name, "--network", "none", image], env=env, check=True,
                   capture_output=True)
    try:
        check = ("import time, urllib.request as r\nfor _ in range(600):\n    try:\n"
                 "        print(r.urlopen('http://127.0.0.1:3000/readyz').status); break\n"
                 "    except OSError: time.sleep(0.2)")
        ready = subprocess.run(["podman", "exec", name, "python", "-c", check], env=env, capture_output=True,
                               text=True, timeout=180)
        assert ready.stdout.strip() == "200", ready.stdout + ready.stderr
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], env=env, capture_output=True)


@pytest.mark.container
def test_offline_build_fails_twice_and_says_network(built_image, tmp_path):
    """A real build whose RUN step cannot reach PyPI: retried once, then named a network failure."""
    _, env, state = built_image
    (tmp_path / "Dockerfile").write_text(
        f"FROM {base_image.BASE_IMAGE}\n"
        "RUN python3 -m venv /tmp/v && /tmp/v/bin/pip install --retries 1 --timeout 5 uv==0.13.9\n")
    cmd = ["buildah", "bud", "--network", "none", "-f", str(tmp_path / "Dockerfile"), "-t", "offline-test",
           str(tmp_path)]
    attempts = []
    with pytest.raises(commands.NetworkBuildError, match="NETWORK"):
        commands.run_with_network_retry(cmd, env=env, log_path=tmp_path / "build.log", what="offline build",
                                         before_retry=lambda: attempts.append(1))
    assert attempts == [1]
