"""Build the Bento's container image when a container builder is available.

Backends, in the order ``auto`` tries them: docker (only when its daemon answers),
podman, buildah. With none present the stage is skipped with a clear reason; the
pipeline is still complete up to the Bento, which ``bentoml serve`` can run.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from training.config import PipelineConfig

log = logging.getLogger(__name__)

BACKENDS = ("docker", "podman", "buildah")


def _healthy(backend: str) -> tuple[bool, str]:
    exe = shutil.which(backend)
    if exe is None:
        return False, f"{backend}: not installed"
    probe = {"docker": [exe, "info"], "podman": [exe, "info"], "buildah": [exe, "version"]}[backend]
    try:
        result = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{backend}: {exc}"
    if result.returncode != 0:
        return False, f"{backend}: `{' '.join(probe[1:])}` failed: {result.stderr.strip()[:200]}"
    return True, f"{backend}: ok"


def find_backend(config: PipelineConfig) -> tuple[str | None, str]:
    """The first healthy backend allowed by ``config.container_backend``, and why."""
    wanted = config.container_backend.strip().lower()
    if wanted == "none":
        return None, "container_backend=none"
    candidates = BACKENDS if wanted == "auto" else (wanted,)
    if wanted not in ("auto", *BACKENDS):
        raise ValueError(f"container_backend={wanted!r}; use auto, none, {', '.join(BACKENDS)}")
    reasons = []
    for backend in candidates:
        ok, reason = _healthy(backend)
        if ok:
            return backend, reason
        reasons.append(reason)
    return None, "no healthy container builder (" + "; ".join(reasons) + ")"


def containerize(config: PipelineConfig, bento_tag: str) -> str | None:
    """Build the image for ``bento_tag``; return the image tag, or None when skipped."""
    from training.bento import use_bentoml_home

    backend, reason = find_backend(config)
    if backend is None:
        log.warning("skipping containerize: %s. Install docker, podman or buildah to build the image; "
                    "the Bento %s can still be served with `bentoml serve`.", reason, bento_tag)
        return None
    bentoml = use_bentoml_home(config)
    image = f"{config.image_name}:{bento_tag.split(':')[-1]}"
    log.info("containerizing %s with %s as %s", bento_tag, backend, image)
    bentoml.container.build(bento_tag, backend=backend, image_tag=(image,))
    return image
