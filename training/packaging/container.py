"""The Bento's container image: build it with docker, podman or buildah, label, tag and run it.

With no builder the stage is skipped with the reason; the Bento can still be served. Podman and
buildah use a private configuration and image store under ``<state_dir>/containers``. We run the
builder ourselves, not ``bentoml containerize``, so that its log is kept, a network failure is
retried once and named, and a failed build is an error (``bentoml.container.build`` returns None).
How the base is chosen: docs/deploy.md; the labels and tags: docs/serving.md.

    python -m training.packaging.container base-image | image [--bento TAG] [--output IMAGE.oci.tar] | env
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from training.config import PipelineConfig
from training.packaging.commands import NetworkBuildError, run_with_network_retry
from training.packaging.server import wait_ready

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[2]
TEMPLATES = PROJECT_DIR / "deploy" / "containers"
BACKENDS = ("docker", "podman", "buildah")
IMAGE_NAME = "cifar10-classifier"
# Docker hosts pull this base: the local base's Debian release and Python, so the Bento's wheels fit
# either; fully qualified (no short-name lookup) and pinned by digest, as bentofile.yaml names it.
REGISTRY_BASE_IMAGE = ("docker.io/library/python:3.11-slim-bookworm"
                       "@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b")
# deploy/containers/Dockerfile.template builds FROM this build argument.
BASE_IMAGE_ARG = "BASE_IMAGE"
# The host's CA bundle is mounted here (read-only) while packages are installed, so the
# build works behind a TLS-inspecting proxy without baking that CA into the image.
BUILD_CA_MOUNT = "/tmp/build-ca.pem"
HOST_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
# The only paths writable where the image is deployed (deploy/k8s/bento.yaml, deploy/compose.yaml):
# temporary files and the Prometheus client's per-worker metric files.
WRITABLE_PATHS = ("/tmp", "/home/bentoml/prometheus_multiproc_dir")


def container_dir(config: PipelineConfig) -> Path:
    """The pipeline's private container folder: config, image store, logs."""
    return config.state_path / "containers"


def container_env(config: PipelineConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment whose podman/buildah use the private config and store (rendered here)."""
    root = container_dir(config)
    conf = root / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    driver = "overlay" if "overlay" in Path("/proc/filesystems").read_text() else "vfs"
    for name in ("containers.conf", "storage.conf"):
        text = (TEMPLATES / name).read_text().replace("@STATE@", str(root)).replace("@DRIVER@", driver)
        target = conf / name
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
    (root / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ if base is None else base)
    env.update(CONTAINERS_CONF=str(conf / "containers.conf"), CONTAINERS_STORAGE_CONF=str(conf / "storage.conf"),
               TMPDIR=str(root / "tmp"))
    return env


def _healthy(backend: str, env: dict[str, str] | None = None) -> tuple[bool, str]:
    exe = shutil.which(backend)
    if exe is None:
        return False, f"{backend}: not installed"
    try:
        result = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{backend}: {exc}"
    if result.returncode != 0:
        return False, f"{backend}: `info` failed: {result.stderr.strip()[:200]}"
    return True, f"{backend}: ok"


def find_backend(config: PipelineConfig, env: dict[str, str] | None = None) -> tuple[str | None, str]:
    """The first healthy backend allowed by ``config.container_backend``, and why."""
    wanted = config.container_backend.strip().lower()
    if wanted == "none":
        return None, "container_backend=none"
    if wanted not in ("auto", *BACKENDS):
        raise ValueError(f"container_backend={wanted!r}; use auto, none, {', '.join(BACKENDS)}")
    candidates = BACKENDS if wanted == "auto" else (wanted,)
    reasons = []
    for backend in candidates:
        ok, reason = _healthy(backend, env)
        if ok:
            return backend, reason
        reasons.append(reason)
    return None, "no healthy container builder (" + "; ".join(reasons) + ")"


def choose_base_image(backend: str, override: str = "") -> str:
    """The image the Bento's image is built on: ``override`` when set, else the backend's default: docker,
    found only where a daemon answers, pulls :data:`REGISTRY_BASE_IMAGE`; podman and buildah, used here
    without a registry, build on the local debootstrap base."""
    from training.packaging.base_image import BASE_IMAGE

    if override.strip():
        return override.strip()
    if backend == "docker":
        return REGISTRY_BASE_IMAGE
    if backend in ("podman", "buildah"):
        return BASE_IMAGE
    raise ValueError(f"no base image for backend {backend!r}; use one of {', '.join(BACKENDS)}")


def check_base_image(image: str, config: PipelineConfig) -> None:
    """Raise ValueError, saying what to do, for a base image that is neither a default, nor listed in
    ``allowed_base_images``, nor pinned by digest: a name may point at other content tomorrow."""
    from training.packaging.base_image import BASE_IMAGE

    image = image.strip()
    listed = {i.strip() for i in config.allowed_base_images.split(",") if i.strip()}
    allowed = {REGISTRY_BASE_IMAGE, BASE_IMAGE} | listed
    if not image or image in allowed or re.fullmatch(r"[^@\s]+@sha256:[0-9a-f]{64}", image):
        return
    raise ValueError(f"base image {image!r} is neither allowed nor pinned by digest: name it as IMAGE@sha256:<64 hex "
                     f"digits>, or have the operator add it to CIFAR10_ALLOWED_BASE_IMAGES (allowed now: "
                     f"{', '.join(sorted(allowed))})")


def build_command(backend: str, dockerfile: str, context: str, tags: list[str],
                  build_args: dict[str, str] | None = None, labels: dict[str, str] | None = None) -> list[str]:
    """The build command line for ``backend`` (host network while building, layers cached)."""
    args = sum((["-t", t] for t in tags), [])
    args += sum((["--build-arg", f"{k}={v}"] for k, v in (build_args or {}).items()), [])
    args += sum((["--label", f"{k}={v}"] for k, v in (labels or {}).items()), [])
    if backend == "docker":
        return ["docker", "build", "--network", "host", "-f", dockerfile, *args, context]
    cmd = ["buildah", "bud"] if backend == "buildah" else ["podman", "build"]
    cmd += ["--layers", "--network", "host", "-f", dockerfile, *args]
    ca = next((p for p in HOST_CA_BUNDLES if Path(p).exists()), None)
    if ca:
        cmd += ["--volume", f"{ca}:{BUILD_CA_MOUNT}:ro"]
    return [*cmd, context]


def image_labels(bento, model) -> dict[str, str]:
    """The image's labels: the OCI keys registries show, and the MLflow lineage (``ai.cifar10.*``) of what
    it serves, from the Bento's labels and its BentoML model's metadata."""
    labels, meta = bento.info.labels, model.info.metadata
    return {
        "org.opencontainers.image.title": bento.tag.name,
        "org.opencontainers.image.version": bento.tag.version,
        "org.opencontainers.image.revision": meta.get("git_commit") or "unknown",
        "ai.cifar10.bento.tag": str(bento.tag),
        "ai.cifar10.bentoml.model": str(model.tag),
        "ai.cifar10.mlflow.model": labels.get("mlflow_model", ""),
        "ai.cifar10.mlflow.version": labels.get("mlflow_version", ""),
        "ai.cifar10.mlflow.run_id": labels.get("mlflow_run_id", ""),
        "ai.cifar10.dataset.digest": meta.get("dataset_digest", ""),
    }


def _image_cli(backend: str) -> str:
    """The tool that manages images in ``backend``'s store: podman reads buildah's store, so it wins there."""
    return "podman" if backend == "buildah" and shutil.which("podman") else backend


def image_size(backend: str, image: str, env: dict[str, str]) -> int:
    """Size of ``image`` in bytes, as the store reports it."""
    out = subprocess.run([_image_cli(backend), "image", "inspect", "--format", "{{.Size}}", image], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[0])


def prepare_base_image(config: PipelineConfig, backend: str, env: dict[str, str], override: str | None = None) -> str:
    """Choose the base for ``backend`` and build it when it is the local one; return its name."""
    from training.packaging.base_image import BASE_IMAGE, ensure_base_image

    base = choose_base_image(backend, config.base_image if override is None else override)
    check_base_image(base, config)
    if base == BASE_IMAGE:
        ensure_base_image(["docker"] if backend == "docker" else ["podman"], env, container_dir(config) / "base")
    return base


def containerize(config: PipelineConfig, bento_tag: str, base_image: str | None = None) -> str | None:
    """Build the image for ``bento_tag``; return the image tag, or None when skipped.

    ``base_image`` overrides the base (None: ``config.base_image``, then the backend's default).
    """
    from training.packaging.bento import bento_model_tag, use_bentoml_home

    env = container_env(config)
    backend, reason = find_backend(config, env)
    if backend is None:
        log.warning("skipping containerize: %s. Install docker, podman or buildah (.ci/setup-container-tools.sh) "
                    "to build the image; the Bento %s can still be served with `bentoml serve`.", reason, bento_tag)
        return None
    bentoml = use_bentoml_home(config)
    bento = bentoml.bentos.get(bento_tag)
    labels = image_labels(bento, bentoml.models.get(bento_model_tag(bento)))
    base = prepare_base_image(config, backend, env, base_image)
    # Only the version tag: `latest` moves (tag_image) when a served-artifact check has passed.
    image = f"{IMAGE_NAME}:{bento.tag.version}"
    log.info("containerizing %s with %s as %s on %s", bento.tag, backend, image, base)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=container_dir(config) / "tmp", prefix="context-") as tmp:
        # The build context: the Bento with its models copied in, and the Dockerfile BentoML generated.
        context = Path(tmp) / "bento"
        bentoml.bentos.export_bento(bento.tag, str(context), output_format="folder")
        cmd = build_command(backend, str(context / "env" / "docker" / "Dockerfile"), str(context), [image],
                            build_args={BASE_IMAGE_ARG: base}, labels=labels)
        _build(cmd, env, container_dir(config) / "logs" / f"build-{bento.tag.version}.log", base,
               f"building image {image} with {backend} on {base}")
    size = image_size(backend, image, env)
    log.info("built %s in %.0f s: %.0f MB", image, time.monotonic() - started, size / 1e6)
    return image


def _build(cmd: list[str], env: dict[str, str], log_path: Path, base: str, what: str) -> None:
    """Run the build; a network failure on the registry's base says how to build without the registry."""
    try:
        run_with_network_retry(cmd, env=env, log_path=log_path, what=what)
    except NetworkBuildError as exc:
        if base != REGISTRY_BASE_IMAGE:
            raise
        from training.packaging.base_image import BASE_IMAGE

        raise NetworkBuildError(f"{exc}\nIf this machine cannot reach the registry for {base}, build on the local "
                                f"debootstrap base instead: set CIFAR10_BASE_IMAGE={BASE_IMAGE} (base_image).") from exc


def _image_store(config: PipelineConfig) -> tuple[str | None, str, dict[str, str]]:
    """The CLI that manages the pipeline's image store (None, and why, without a builder), and its environment."""
    env = container_env(config)
    backend, reason = find_backend(config, env)
    return (_image_cli(backend) if backend else None), reason, env


def _exists(cli: str, image: str, env: dict[str, str]) -> bool:
    probe = {"podman": ["podman", "image", "exists", image], "docker": ["docker", "image", "inspect", image],
             "buildah": ["buildah", "inspect", "--type", "image", image]}[cli]
    return subprocess.run(probe, env=env, capture_output=True, timeout=60).returncode == 0


def image_exists(config: PipelineConfig, image: str) -> bool:
    """Whether ``image`` is in the store the pipeline builds into; False when no builder is available."""
    cli, _, env = _image_store(config)
    return cli is not None and _exists(cli, image, env)


def tag_image(config: PipelineConfig, bento_tag: str, tag: str = "latest") -> str | None:
    """Tag the built image ``<IMAGE_NAME>:<bento version>`` as ``<IMAGE_NAME>:<tag>``; return the new tag.

    None, with a log line saying why, when no builder is available or that image was never built
    (containerize skipped). ``bento_tag`` without a version (or ``:latest``) is resolved in the Bento store.
    """
    cli, reason, env = _image_store(config)
    if cli is None:
        log.warning("not tagging an image for %s as %s: %s", bento_tag, tag, reason)
        return None
    _, _, version = bento_tag.partition(":")
    if not version or version == "latest":
        from training.packaging.bento import use_bentoml_home

        version = use_bentoml_home(config).bentos.get(bento_tag).tag.version
    source, target = f"{IMAGE_NAME}:{version}", f"{IMAGE_NAME}:{tag}"
    if not _exists(cli, source, env):
        log.warning("not tagging %s as %s: %s has no image %s (containerize skipped or failed for it)",
                    bento_tag, target, cli, source)
        return None
    subprocess.run([cli, "tag", source, target], env=env, check=True, capture_output=True, text=True)
    log.info("tagged %s as %s", source, target)
    return target


@contextlib.contextmanager
def serve_image(config: PipelineConfig, image: str, port: int, timeout: float = 300,
                name: str | None = None) -> Iterator[str]:
    """Run ``image`` on ``127.0.0.1:port``, confined as where it is deployed (:func:`locked_down`), until it
    answers /readyz; yield its base URL; always remove it.

    Raises :class:`~training.packaging.server.NotReady` with the container's log tail when it stops or
    is not ready within ``timeout`` seconds, RuntimeError when no runtime (podman, docker) is available.
    """
    env = container_env(config)
    backend, reason = find_backend(config, env)
    if backend is None or (backend != "docker" and not shutil.which("podman")):
        why = reason if backend is None else "buildah builds images but cannot run them"
        raise RuntimeError(f"cannot run {image}: {why}; install podman (.ci/setup-container-tools.sh) or docker")
    cli = "docker" if backend == "docker" else "podman"
    name = name or f"cifar10-serve-{port}-{os.getpid()}"
    url = f"http://127.0.0.1:{port}"

    def ask(*args: str) -> str:
        done = subprocess.run([cli, *args], env=env, capture_output=True, text=True)
        return (done.stdout + done.stderr).strip()

    subprocess.run([cli, "run", "-d", "--name", name, *locked_down(cli), "-p", f"127.0.0.1:{port}:3000", image],
                   env=env, check=True, capture_output=True, text=True)
    try:
        wait_ready(url, timeout, alive=lambda: ask("inspect", "--format", "{{.State.Running}}", name) == "true",
                   log=lambda: ask("logs", "--tail", "40", name))
        yield url
    finally:
        ask("rm", "-f", *(["-t", "0"] if cli == "podman" else []), name)


def locked_down(cli: str) -> list[str]:
    """``run`` options that confine the container as deploy/k8s/bento.yaml does: a read-only root filesystem
    but for :data:`WRITABLE_PATHS`, no capabilities, no gaining privileges (setuid); the image's own
    non-root user. A check run this way passes only an image that works where it is deployed."""
    options = ["--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges"]
    if cli == "podman":  # podman would add writable /tmp, /var/tmp and /run on its own; Kubernetes does not
        options.append("--read-only-tmpfs=false")
    for path in WRITABLE_PATHS:
        options += ["--tmpfs", f"{path}:rw,nosuid,nodev,mode=1777"]
    return options


def export_image(config: PipelineConfig, image: str, output: Path) -> Path:
    """Write ``image`` as an OCI archive (``podman load -i`` / ``docker load -i`` read it)."""
    env = container_env(config)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    if shutil.which("podman"):
        cmd = ["podman", "save", "--format", "oci-archive", "-o", str(output), image]
    else:  # docker >= 25 writes an OCI image layout inside its archive
        cmd = ["docker", "save", "-o", str(output), image]
    subprocess.run(cmd, env=env, check=True)
    return output


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.packaging.container", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print export lines for podman/buildah with the private store")
    base_cmd = sub.add_parser("base-image", help="build the local base image when the image will use it "
                              "(podman/buildah, or --base-image naming it), unless it is up to date")
    img = sub.add_parser("image", help="containerize a Bento and export it as an OCI archive")
    img.add_argument("--bento", default="cifar10-classifier:latest")
    img.add_argument("--output", type=Path, help="OCI archive path (default: <state>/<image>.oci.tar)")
    for command in (base_cmd, img):
        command.add_argument("--base-image", default=None,
                             help="base of the Bento image (default: base_image setting, CIFAR10_BASE_IMAGE, "
                                  f"else {REGISTRY_BASE_IMAGE} with docker, the local base with podman/buildah)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``base-image``, ``image`` (containerize + export) and ``env`` for the Makefile."""
    from training.config import load_config

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config()
    if config.container_backend == "none":  # asked for by name here: find a builder
        config = config.replace(container_backend="auto")
    env = container_env(config)
    if args.command == "env":
        for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
            print(f"export {key}={env[key]}")
    elif args.command == "base-image":
        backend, reason = find_backend(config, env)
        if backend is None:
            raise SystemExit(f"{reason}: install docker, podman or buildah (.ci/setup-container-tools.sh)")
        print(f"{backend} builds the image on {prepare_base_image(config, backend, env, args.base_image)}")
    else:
        image = containerize(config, args.bento, args.base_image)
        if image is None:
            raise SystemExit("no container builder: run .ci/setup-container-tools.sh")
        output = args.output or config.state_path / f"{image.replace(':', '-')}.oci.tar"
        export_image(config, image, output)
        print(f"{image} -> {output} ({output.stat().st_size / 1e6:.0f} MB)\n"
              f"load it with: podman load -i {output}  (or docker load -i {output})")


if __name__ == "__main__":
    main()
