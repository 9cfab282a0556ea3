"""The Bento image's base for podman/buildah, made locally: there is no registry to pull one from.

``debootstrap --variant=minbase`` of Debian bookworm with Python 3.11 (the Bento's, so none is
downloaded into the image) and the CA bundle, upgraded to bookworm-updates and -security, trimmed,
imported as an image. It is rebuilt when its recipe changed or it is older than :data:`MAX_AGE_DAYS`
(so security fixes reach the next image), else reused.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

from training.packaging.commands import run_with_network_retry

log = logging.getLogger(__name__)

BASE_IMAGE = "localhost/cifar10-bento-base:bookworm"
RECIPE_LABEL = "org.cifar10-mlops.base-recipe"
BUILT_LABEL = "org.cifar10-mlops.base-built"
# Debian publishes security fixes every few days.
MAX_AGE_DAYS = 7
# The archives a Debian mirror serves, and deb.debian.org's, when the host's apt sources name none.
DEFAULT_MIRRORS = {"debian": "http://deb.debian.org/debian", "debian-security": "http://deb.debian.org/debian-security"}
DEFAULT_MIRROR = DEFAULT_MIRRORS["debian"]

# Everything that decides the image's content; its hash is the cache key.
RECIPE = {
    "version": 2,
    "suite": "bookworm",
    # Upgraded to at build time, and named in the image's apt sources: the release's point updates
    # (from the main archive) and its security fixes (from the security archive).
    "updates": {"debian": ["bookworm-updates"], "debian-security": ["bookworm-security"]},
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
                  legacy: Path = Path("/etc/apt/sources.list"), archive: str = "debian") -> str:
    """The host's mirror of ``archive`` (``debian``, or ``debian-security``: the one apt already reaches),
    else deb.debian.org's."""
    lines = []
    for path in (sources, legacy):
        if path.exists():
            lines += path.read_text().splitlines()
    for line in lines:
        if line.startswith(("URIs:", "deb ")):
            for uri in line.split()[1:]:
                if uri.startswith("http") and uri.rstrip("/").endswith(f"/{archive}"):
                    return uri
    return DEFAULT_MIRRORS[archive]


def apt_sources(mirrors: dict[str, str], recipe: dict = RECIPE) -> str:
    """The image's /etc/apt/sources.list.d/debian.sources: the release and its update suites."""
    suites = {archive: ([recipe["suite"]] if archive == "debian" else []) + updates
              for archive, updates in recipe["updates"].items()}
    return "\n".join(f"Types: deb\nURIs: {mirrors[archive]}\nSuites: {' '.join(names)}\nComponents: main\n"
                     "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n" for archive, names in suites.items())


def current_recipe(backend_cmd: list[str], env: dict[str, str], image: str = BASE_IMAGE) -> tuple[str, str] | None:
    """(recipe hash, build time) of the stored ``image``; None when it is missing."""
    labels = "{{ index .Config.Labels \"%s\" }} {{ index .Config.Labels \"%s\" }}" % (RECIPE_LABEL, BUILT_LABEL)
    result = subprocess.run([*backend_cmd, "image", "inspect", "--format", labels, image],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return None
    recipe, _, built = result.stdout.strip().partition(" ")
    return recipe, built.strip()


def rebuild_reason(stored: tuple[str, str] | None, want: str, now: datetime.datetime) -> str | None:
    """Why the base must be built again (missing, another recipe, too old to have the latest security fixes),
    or None to reuse it."""
    if stored is None:
        return "no base image stored"
    recipe, built = stored
    if recipe != want:
        return f"recipe {recipe or 'none'} is not {want}"
    try:
        age = now - datetime.datetime.fromisoformat(built)
    except ValueError:
        return "its build time is unknown"
    if age > datetime.timedelta(days=MAX_AGE_DAYS):
        return f"built {age.days} days ago: newer security fixes may be out"
    return None


def ensure_base_image(importer: list[str], env: dict[str, str], work_dir: Path,
                      image: str = BASE_IMAGE) -> str:
    """Build ``image`` unless the stored one is this recipe's and recent; return ``image``.

    ``importer`` is the CLI that owns the image store (``["podman"]`` or ``["docker"]``); ``env``
    points podman at the pipeline's private storage.
    """
    want = recipe_hash()
    now = datetime.datetime.now(datetime.timezone.utc)
    reason = rebuild_reason(current_recipe(importer, env, image), want, now)
    if reason is None:
        log.info("base image %s is up to date (recipe %s)", image, want)
        return image
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is needed to make the base image: run .ci/setup-container-tools.sh "
                           "(apt-get install debootstrap)")
    log.info("building base image %s (recipe %s): %s", image, want, reason)
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        cmd = ["debootstrap", f"--variant={RECIPE['variant']}", "--include=" + ",".join(RECIPE["include"]),
               RECIPE["suite"], str(rootfs), debian_mirror()]

        def clean_partial() -> None:
            shutil.rmtree(rootfs, ignore_errors=True)

        run_with_network_retry(cmd, env=env, log_path=work_dir / "debootstrap.log", what="debootstrap of the base image",
                               before_retry=clean_partial)
        _upgrade(rootfs, env, work_dir)
        _trim(rootfs)
        _import(rootfs, importer, env, image, [f"LABEL {RECIPE_LABEL}={want}",
                                              f"LABEL {BUILT_LABEL}={now.isoformat(timespec='seconds')}"])
    log.info("built base image %s (recipe %s)", image, want)
    return image


def _import(rootfs: Path, importer: list[str], env: dict[str, str], image: str, labels: list[str]) -> None:
    """Import ``rootfs`` as ``image`` with the recipe's environment and ``labels``."""
    changes = [f"ENV {k}={v}" for k, v in RECIPE["env"].items()] + labels + ['CMD ["/bin/bash"]']
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run([*importer, "import", *sum((["--change", c] for c in changes), []), "-", image],
                              stdin=tar.stdout, capture_output=True, text=True, env=env)
    tar.stdout.close()
    if tar.wait() != 0 or imported.returncode != 0:
        raise RuntimeError(f"importing the base image failed: {imported.stderr.strip()[-1000:]}")


def _upgrade(rootfs: Path, env: dict[str, str], work_dir: Path) -> None:
    """Point the root filesystem's apt at the release and its update suites, and upgrade it to them."""
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)  # debootstrap's: the release alone
    mirrors = {archive: debian_mirror(archive=archive) for archive in RECIPE["updates"]}
    (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(apt_sources(mirrors))
    resolv = rootfs / "etc/resolv.conf"
    had_resolv = resolv.exists() or resolv.is_symlink()
    if not had_resolv:  # the chroot resolves the mirror's name as the host does, and keeps nothing of it
        shutil.copy("/etc/resolv.conf", resolv)
    upgrade = ("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get -y --no-install-recommends "
               "-o Dpkg::Options::=--force-confold upgrade")
    # Host paths mean nothing inside the root filesystem (a host TMPDIR broke ca-certificates' postinst);
    # only the proxy settings carry over.
    chroot_env = {**{k: v for k, v in env.items() if k.lower().endswith("_proxy")},
                  "PATH": RECIPE["env"]["PATH"], "LC_ALL": "C.UTF-8", "HOME": "/root", "TMPDIR": "/tmp"}
    subprocess.run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], check=True)
    try:
        run_with_network_retry(["chroot", str(rootfs), "sh", "-c", upgrade], env=chroot_env,
                               log_path=work_dir / "apt-upgrade.log", what="apt-get upgrade of the base image")
    finally:
        subprocess.run(["umount", str(rootfs / "proc")], check=False)
        if not had_resolv:
            resolv.unlink(missing_ok=True)


def _trim(rootfs: Path) -> None:
    for pattern in RECIPE["trim"]:
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
