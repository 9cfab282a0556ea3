"""Build the Bento's container image when a container builder is available.

Backends, in the order ``auto`` tries them: docker (only when its daemon answers),
podman, buildah. With none present the stage is skipped with a clear reason; the
pipeline is still complete up to the Bento, which ``bentoml serve`` can run.

Podman and buildah use a private configuration and image store under
``<state_dir>/containers`` (``CONTAINERS_CONF``/``CONTAINERS_STORAGE_CONF``, rendered
from ``deploy/containers/``), never the machine-wide one.

The image's base follows the backend (:func:`choose_base_image`): docker, which runs where a
daemon and a registry are the norm, pulls the slim Python image; podman and buildah build on
the local debootstrap base (:mod:`training.packaging.base_image`), which needs no registry. The
``base_image`` setting (``CIFAR10_BASE_IMAGE``) overrides either; the Dockerfile takes the
base as the ``BASE_IMAGE`` build argument.

BentoML generates the Dockerfile when it builds the Bento (``bentofile.yaml`` ->
``deploy/containers/Dockerfile.template``); we run the builder ourselves so that its log is kept, a
network failure is retried once and named as such, and a failed build is an error
(``bentoml.container.build`` logs failures and returns None).

CLI (the Makefile's ``base-image`` and ``image`` targets)::

    python -m training.packaging.container base-image
    python -m training.packaging.container image [--bento TAG] [--output IMAGE.oci.tar]
    eval "$(python -m training.packaging.container env)"   # then podman images, podman run ...
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from training.config import PipelineConfig
from training.packaging.commands import NetworkBuildError, run_with_network_retry

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[2]
TEMPLATES = PROJECT_DIR / "deploy" / "containers"
BACKENDS = ("docker", "podman", "buildah")
# Docker hosts pull this base from the registry: the same Debian release and Python as the local
# base, so the Bento's wheels fit either. Fully qualified, so that podman or buildah given it as an
# override need no short-name lookup.
REGISTRY_BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
# deploy/containers/Dockerfile.template builds FROM this build argument.
BASE_IMAGE_ARG = "BASE_IMAGE"
# The host's CA bundle is mounted here (read-only) while packages are installed, so the
# build works behind a TLS-inspecting proxy without baking that CA into the image.
BUILD_CA_MOUNT = "/tmp/build-ca.pem"
HOST_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")

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
    probe = {"docker": [exe, "info"], "podman": [exe, "info"], "buildah": [exe, "info"]}[backend]
    try:
        result = subprocess.run(probe, capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{backend}: {exc}"
    if result.returncode != 0:
        return False, f"{backend}: `{' '.join(probe[1:])}` failed: {result.stderr.strip()[:200]}"
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
    """The image the Bento's image is built on: ``override`` when set, else the backend's default.

    docker (chosen only when its daemon answers) pulls :data:`REGISTRY_BASE_IMAGE`; podman and
    buildah use the local debootstrap base, since the machines they serve here have no registry.
    """
    from training.packaging.base_image import BASE_IMAGE

    if override.strip():
        return override.strip()
    if backend == "docker":
        return REGISTRY_BASE_IMAGE
    if backend in ("podman", "buildah"):
        return BASE_IMAGE
    raise ValueError(f"no base image for backend {backend!r}; use one of {', '.join(BACKENDS)}")


def build_command(backend: str, dockerfile: str, context: str, tags: list[str],
                  build_args: dict[str, str] | None = None) -> list[str]:
    """The build command line for ``backend`` (host network while building, layers cached)."""
    args = sum((["-t", t] for t in tags), [])
    args += sum((["--build-arg", f"{k}={v}"] for k, v in (build_args or {}).items()), [])
    if backend == "docker":
        return ["docker", "build", "--network", "host", "-f", dockerfile, *args, context]
    cmd = ["buildah", "bud"] if backend == "buildah" else ["podman", "build"]
    cmd += ["--layers", "--network", "host", "-f", dockerfile, *args]
    ca = next((p for p in HOST_CA_BUNDLES if Path(p).exists()), None)
    if ca:
        cmd += ["--volume", f"{ca}:{BUILD_CA_MOUNT}:ro"]
    return [*cmd, context]


def image_size(backend: str, image: str, env: dict[str, str]) -> int:
    """Size of ``image`` in bytes, as the store reports it."""
    cli = "podman" if backend == "buildah" and shutil.which("podman") else backend
    fmt = "{{.Size}}"
    out = subprocess.run([cli, "image", "inspect", "--format", fmt, image], capture_output=True, text=True, env=env,
                         check=True)
    return int(out.stdout.strip().splitlines()[0])


def prepare_base_image(config: PipelineConfig, backend: str, env: dict[str, str], override: str | None = None) -> str:
    """Choose the base for ``backend`` and build it when it is the local one; return its name."""
    from training.packaging.base_image import BASE_IMAGE, ensure_base_image

    base = choose_base_image(backend, config.base_image if override is None else override)
    if base == BASE_IMAGE:
        ensure_base_image(["docker"] if backend == "docker" else ["podman"], env, container_dir(config) / "base")
    return base


def containerize(config: PipelineConfig, bento_tag: str, base_image: str | None = None) -> str | None:
    """Build the image for ``bento_tag``; return the image tag, or None when skipped.

    ``base_image`` overrides the base (None: ``config.base_image``, then the backend's default).
    """
    from training.packaging.bento import use_bentoml_home

    env = container_env(config)
    backend, reason = find_backend(config, env)
    if backend is None:
        log.warning("skipping containerize: %s. Install docker, podman or buildah (.ci/setup-container-tools.sh) "
                    "to build the image; the Bento %s can still be served with `bentoml serve`.", reason, bento_tag)
        return None
    bentoml = use_bentoml_home(config)
    bento = bentoml.bentos.get(bento_tag)
    base = prepare_base_image(config, backend, env, base_image)
    image = f"{config.image_name}:{bento.tag.version}"
    tags = [image, f"{config.image_name}:latest"]
    log.info("containerizing %s with %s as %s on %s", bento.tag, backend, image, base)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=container_dir(config) / "tmp", prefix="context-") as tmp:
        # The exported folder is the build context: the Bento with its models copied in, and
        # the Dockerfile BentoML generated from bentofile.yaml at build time.
        context = Path(tmp) / "bento"
        bentoml.bentos.export_bento(bento.tag, str(context), output_format="folder")
        cmd = build_command(backend, str(context / "env" / "docker" / "Dockerfile"), str(context), tags,
                            build_args={BASE_IMAGE_ARG: base})
        try:
            run_with_network_retry(cmd, env=env,
                                   log_path=container_dir(config) / "logs" / f"build-{bento.tag.version}.log",
                                   what=f"building image {image} with {backend} on {base}")
        except NetworkBuildError as exc:
            if base != REGISTRY_BASE_IMAGE:
                raise
            from training.packaging.base_image import BASE_IMAGE

            raise NetworkBuildError(
                f"{exc}\nIf this machine cannot reach the registry for {base}, build on the local debootstrap base "
                f"instead: set CIFAR10_BASE_IMAGE={BASE_IMAGE} (base_image).") from exc
    size = image_size(backend, image, env)
    log.info("built %s in %.0f s: %.0f MB", image, time.monotonic() - started, size / 1e6)
    return image


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


def main(argv: list[str] | None = None) -> None:
    """``base-image``, ``image`` (containerize + export) and ``env`` for the Makefile."""
    from training.config import load_config

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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config()
    if args.command == "env":
        env = container_env(config)
        for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
            print(f"export {key}={env[key]}")
    elif args.command == "base-image":
        if config.container_backend == "none":
            config = config.replace(container_backend="auto")
        env = container_env(config)
        backend, reason = find_backend(config, env)
        if backend is None:
            raise SystemExit(f"{reason}: install docker, podman or buildah (.ci/setup-container-tools.sh)")
        base = prepare_base_image(config, backend, env, args.base_image)
        print(f"{backend} builds the image on {base}")
    else:
        if config.container_backend == "none":
            config = config.replace(container_backend="auto")
        image = containerize(config, args.bento, args.base_image)
        if image is None:
            raise SystemExit("no container builder: run .ci/setup-container-tools.sh")
        output = args.output or config.state_path / f"{image.replace(':', '-')}.oci.tar"
        export_image(config, image, output)
        print(f"{image} -> {output} ({output.stat().st_size / 1e6:.0f} MB)\n"
              f"load it with: podman load -i {output}  (or docker load -i {output})")


if __name__ == "__main__":
    main()
