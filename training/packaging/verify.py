"""The served-artifact gate: the new Bento must answer like the exported model before it is promoted.

Loading the model is not enough (a Bento can pin the wrong model, decode images differently,
or fail to start). The Bento is started with ``bentoml serve`` (and its image with the
container builder, when one was built) and sent a golden set of test images one request at
a time. Each answer must name the same class as the exported ONNX model run here, with every
probability within :data:`TOLERANCE`, carry lineage headers naming this Bento and model
version, and the p99 latency must be within ``served_p99_budget_ms``. Any miss fails the
task with the reason and tags the version ``failed_serving``; ``champion`` does not move.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.config import PipelineConfig
from training.packaging.server import bentoml_serve, free_port, running_server

log = logging.getLogger(__name__)

# Served probabilities may differ from the exported model's by this much (float32 noise).
TOLERANCE = 1e-4
# Images in the one /predict_batch request of the check.
BATCH_IMAGES = 8


class ServedArtifactError(RuntimeError):
    """The Bento or its image did not answer like the exported model."""


@dataclass(frozen=True)
class Check:
    """What one served artifact did with the golden set."""

    target: str
    requests: int
    p99_ms: float
    max_abs_diff: float


def golden_set(prepared_dir: Path, n: int, seed: int) -> np.ndarray:
    """``n`` test images drawn with ``seed``, stratification left to the split itself."""
    from training.data.prepare import load_prepared

    splits, _ = load_prepared(Path(prepared_dir))
    x, _ = splits["test"]
    pick = np.sort(np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False))
    return x[pick]


def png(image: np.ndarray) -> bytes:
    """Lossless bytes, so the service decodes exactly the pixels the exported model sees."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@contextmanager
def serve_bento(config: PipelineConfig, bento_tag: str, log_path: Path):
    """``bentoml serve bento_tag`` on a free local port until the block ends; yields its URL."""
    from training.packaging.bento import use_bentoml_home

    use_bentoml_home(config)  # BENTOML_HOME for the server, the store the Bento was built in
    port = free_port()
    with running_server(bentoml_serve(bento_tag, port), log_path, port, config.served_start_timeout) as url:
        yield url


def check_answers(url: str, images: np.ndarray, expected: np.ndarray, class_names: list[str],
                  lineage: dict[str, str], budget_ms: float) -> Check:
    """Send ``images`` to ``url``; raise :class:`ServedArtifactError` unless every answer matches ``expected``."""
    import requests

    problems, latencies, worst = [], [], 0.0
    bodies = [png(image) for image in images]

    def compare(i: int, resp) -> None:
        nonlocal worst
        for header, value in lineage.items():
            if resp.headers.get(header) != value:
                problems.append(f"image {i}: header {header} is {resp.headers.get(header)!r}, expected {value!r}")
        answer = resp.json()
        probs = np.array([answer["probabilities"][c] for c in class_names])
        worst = max(worst, float(np.max(np.abs(probs - expected[i]))))
        if answer["class_id"] != int(expected[i].argmax()):
            problems.append(f"image {i}: class {answer['label']}, the exported model says "
                            f"{class_names[int(expected[i].argmax())]}")

    from serving.settings import client_headers

    with requests.Session() as http:
        http.headers.update(client_headers())
        for i, body in enumerate(bodies):
            started = time.perf_counter()
            try:
                resp = http.post(f"{url}/predict", files={"file": (f"golden-{i}.png", body, "image/png")}, timeout=30)
            except requests.RequestException as exc:
                problems.append(f"image {i}: {type(exc).__name__}: {exc}")
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            if resp.status_code != 200:
                problems.append(f"image {i}: HTTP {resp.status_code}: {resp.text[:200]}")
                continue
            compare(i, resp)
        n = min(BATCH_IMAGES, len(bodies))
        resp = http.post(f"{url}/predict_batch", timeout=60,
                         files=[("files", (f"golden-{i}.png", bodies[i], "image/png")) for i in range(n)])
        if resp.status_code != 200:
            problems.append(f"/predict_batch: HTTP {resp.status_code}: {resp.text[:200]}")
        else:
            for header, value in lineage.items():
                if resp.headers.get(header) != value:
                    problems.append(f"/predict_batch: header {header} is {resp.headers.get(header)!r}, "
                                    f"expected {value!r}")
            answers = resp.json()
            if len(answers) != n:
                problems.append(f"/predict_batch: {len(answers)} answers to {n} images")
            for i, answer in enumerate(answers[:n]):
                probs = np.array([answer["probabilities"][c] for c in class_names])
                worst = max(worst, float(np.max(np.abs(probs - expected[i]))))
                if answer["class_id"] != int(expected[i].argmax()):
                    problems.append(f"/predict_batch image {i}: class {answer['label']}, the exported model says "
                                    f"{class_names[int(expected[i].argmax())]}")
    p99 = float(np.percentile(latencies, 99)) if latencies else float("inf")
    if worst > TOLERANCE:
        problems.append(f"probabilities differ from the exported model's by up to {worst:.3g} (> {TOLERANCE:g})")
    if p99 > budget_ms:
        problems.append(f"p99 latency {p99:.1f} ms over the budget of {budget_ms:g} ms (served_p99_budget_ms)")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ServedArtifactError(f"{url}: {len(problems)} problem(s) with {len(images)} golden images: {shown}")
    return Check(url, len(bodies) + 1, p99, worst)


def verify(config: PipelineConfig, version_uri: str, bento_tag: str, prepared_dir: Path) -> str:
    """The served-artifact gate for ``bento_tag`` (model version ``version_uri``); returns ``bento_tag``.

    The image ``<image_name>:<bento version>`` is checked too when containerize built it.
    On failure the version is tagged ``failed_serving`` with the reason, and the error is raised.
    """
    from mlflow.entities import Metric

    from training.packaging import container
    from training.packaging.bento import use_bentoml_home
    from training.registry.evaluation import onnx_of_run
    from training.registry.promotion import client_for, mark_failed_serving, split_uri

    name, version = split_uri(version_uri)
    client = client_for(config)
    mv = client.get_model_version(name, version)
    images = golden_set(prepared_dir, config.golden_images, config.seed)
    with tempfile.TemporaryDirectory() as tmp:
        session, class_names = onnx_of_run(mv.run_id, Path(tmp))
        expected = session.run(None, {session.get_inputs()[0].name: images.astype(np.float32)})[0]
    bento = use_bentoml_home(config).bentos.get(bento_tag)
    lineage = {"X-Bento-Tag": str(bento.tag), "X-MLflow-Model": name, "X-MLflow-Model-Version": str(version),
               "X-MLflow-Run-Id": mv.run_id}
    image = f"{config.image_name}:{bento.tag.version}"
    logs = config.state_path / "logs" / "verify"
    checks = []
    try:
        with serve_bento(config, bento_tag, logs / f"bento-{bento.tag.version}.log") as url:
            checks.append(check_answers(url, images, expected, class_names, lineage, config.served_p99_budget_ms))
        if container.image_exists(config, image):
            with container.serve_image(config, image, free_port(), timeout=config.served_start_timeout) as url:
                checks.append(check_answers(url, images, expected, class_names, lineage,
                                            config.served_p99_budget_ms))
        else:
            log.info("no image %s (containerize was skipped): checking the Bento only", image)
    except Exception as exc:  # any failure of the check keeps the model from being promoted
        reason = f"served-artifact check of {bento_tag} failed: {exc}"
        mark_failed_serving(config, version_uri, reason[:5000])
        raise ServedArtifactError(f"{reason}\nchampion was not moved; the served model is unchanged.") from exc
    now_ms = int(time.time() * 1000)
    client.log_batch(mv.run_id, metrics=[
        Metric(f"served_{kind}_{key}", value, now_ms, 0)
        for kind, check in zip(("bento", "image"), checks)
        for key, value in (("p99_ms", check.p99_ms), ("max_abs_diff", check.max_abs_diff))])
    for kind, check in zip(("bento", "image"), checks):
        log.info("served-artifact check of the %s passed: %d golden images, p99 %.1f ms (budget %g ms), "
                 "max |p - exported| %.2e", kind, check.requests - 1, check.p99_ms, config.served_p99_budget_ms,
                 check.max_abs_diff)
    client.set_model_version_tag(name, version, "served_check",
                                 f"passed: {', '.join(k for k, _ in zip(('bento', 'image'), checks))}; p99 "
                                 f"{max(c.p99_ms for c in checks):.1f} ms")
    return bento_tag
