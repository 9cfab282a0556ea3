"""The Bento image's base for podman/buildah, made locally: there is no registry to pull one from.

Docker builds pull the registry's slim Python instead (:func:`training.packaging.container.choose_base_image`).

Recipe: ``debootstrap --variant=minbase`` of Debian bookworm with Python 3.11 (the
version the Bento is built with, so no Python is downloaded into the image) and the
CA bundle, trimmed of docs, man pages, locales and apt lists, then imported as an
image. No compiler: the Bento's packages are all wheels.

The image carries the recipe's hash as a label; :func:`ensure_base_image` rebuilds
only when the recipe changed (or the image is missing), so it is built once and
reused by every containerize run that shares the container storage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

from training.packaging.commands import run_with_network_retry

log = logging.getLogger(__name__)

# training/packaging/container.py builds FROM this image with podman/buildah (the BASE_IMAGE build argument).
BASE_IMAGE = "localhost/cifar10-bento-base:bookworm"
RECIPE_LABEL = "org.cifar10-mlops.base-recipe"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Everything that decides the image's content; its hash is the cache key.
RECIPE = {
    "version": 1,
    "suite": "bookworm",
    "variant": "minbase",
    # python3-venv brings ensurepip, which the Dockerfile uses to bootstrap uv.
    "include": ["python3", "python3-venv", "ca-certificates"],
    # Not needed to serve; removed from the root filesystem before import.
    "trim": ["usr/share/doc/*", "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*",
             "usr/share/lintian", "var/lib/apt/lists/*", "var/cache/apt/*", "var/cache/debconf/*-old",
             "var/log/*", "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib"],
    "env": {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
}


def recipe_hash(recipe: dict = RECIPE) -> str:
    """A short, stable hash of ``recipe`` (the base image's cache key)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def debian_mirror(sources: Path = Path("/etc/apt/sources.list.d/debian.sources"),
                  legacy: Path = Path("/etc/apt/sources.list")) -> str:
    """The host's Debian mirror (the one apt already reaches), else deb.debian.org."""
    lines = []
    for path in (sources, legacy):
        if path.exists():
            lines += path.read_text().splitlines()
    for line in lines:
        if line.startswith(("URIs:", "deb ")):
            for uri in line.split()[1:]:
                if uri.startswith("http") and uri.rstrip("/").endswith("/debian"):
                    return uri
    return DEFAULT_MIRROR


def current_recipe(backend_cmd: list[str], env: dict[str, str], image: str = BASE_IMAGE) -> str | None:
    """The recipe hash the stored ``image`` was built from; None when it is missing."""
    result = subprocess.run([*backend_cmd, "image", "inspect", "--format",
                             "{{ index .Config.Labels \"%s\" }}" % RECIPE_LABEL, image],
                            capture_output=True, text=True, env=env)
    return result.stdout.strip() if result.returncode == 0 else None


def ensure_base_image(importer: list[str], env: dict[str, str], work_dir: Path,
                      image: str = BASE_IMAGE) -> str:
    """Build ``image`` unless the stored one has this recipe's hash; return ``image``.

    ``importer`` is the CLI that owns the image store (``["podman"]`` or
    ``["docker"]``); ``env`` points podman at the pipeline's private storage.
    """

    want = recipe_hash()
    have = current_recipe(importer, env, image)
    if have == want:
        log.info("base image %s is up to date (recipe %s)", image, want)
        return image
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is needed to make the base image: run .ci/setup-container-tools.sh "
                           "(apt-get install debootstrap)")
    log.info("building base image %s (recipe %s, stored: %s)", image, want, have or "none")
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        cmd = ["debootstrap", f"--variant={RECIPE['variant']}", "--include=" + ",".join(RECIPE["include"]),
               RECIPE["suite"], str(rootfs), debian_mirror()]

        def clean_partial() -> None:
            shutil.rmtree(rootfs, ignore_errors=True)

        run_with_network_retry(cmd, env=env, log_path=work_dir / "debootstrap.log", what="debootstrap of the base image",
                               before_retry=clean_partial)
        _trim(rootfs)
        changes = [f"ENV {k}={v}" for k, v in RECIPE["env"].items()]
        changes += [f"LABEL {RECIPE_LABEL}={want}", 'CMD ["/bin/bash"]']
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([*importer, "import", *sum((["--change", c] for c in changes), []), "-", image],
                                  stdin=tar.stdout, capture_output=True, text=True, env=env)
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise RuntimeError(f"importing the base image failed: {imported.stderr.strip()[-1000:]}")
    log.info("built base image %s (recipe %s)", image, want)
    return image


def _trim(rootfs: Path) -> None:
    for pattern in RECIPE["trim"]:
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
