"""The served-artifact gate: the new Bento, and its image when one was built, must answer like the
exported model before it is promoted: the same classes and probabilities for golden test images
(:func:`~training.model.export.check_parity`), lineage headers naming this Bento and model version,
and a p99 latency within ``served_p99_budget_ms``. Loading the model is not enough: a Bento can pin
the wrong model, decode images differently or fail to start. A miss tags the version
``failed_serving``; ``champion`` does not move.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.config import PipelineConfig
from training.packaging.server import bentoml_serve, free_port, running_server

log = logging.getLogger(__name__)

# Golden test images sent one request at a time: enough for a p99, seconds on a busy machine.
GOLDEN_IMAGES = 64
# Images in the one /predict_batch request of the check.
BATCH_IMAGES = 8
# Longest wait for the Bento or image to answer /readyz.
START_TIMEOUT_S = 300.0


class ServedArtifactError(RuntimeError):
    """The Bento or its image did not answer like the exported model."""


@dataclass(frozen=True)
class Check:
    """What one served artifact did with the golden set."""

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


def _ask(http, url: str, route: str, field: str, bodies: list[bytes], lineage: dict[str, str],
         problems: list[str], what: str) -> list[dict]:
    """POST ``bodies`` to ``route`` as ``field``; its answers as a list, or [] with the problem noted in ``problems``."""
    import requests

    files = [(field, (f"golden-{i}.png", body, "image/png")) for i, body in enumerate(bodies)]
    try:
        resp = http.post(f"{url}{route}", files=files, timeout=60)
    except requests.RequestException as exc:
        problems.append(f"{what}: {type(exc).__name__}: {exc}")
        return []
    if resp.status_code != 200:
        problems.append(f"{what}: HTTP {resp.status_code}: {resp.text[:200]}")
        return []
    problems += [f"{what}: header {header} is {resp.headers.get(header)!r}, expected {value!r}"
                 for header, value in lineage.items() if resp.headers.get(header) != value]
    answers = resp.json()
    return answers if isinstance(answers, list) else [answers]


def _compare(what: str, answers: list[dict], expected: np.ndarray, class_names: list[str],
             problems: list[str]) -> float:
    """:func:`~training.model.export.check_parity` of ``answers`` (probabilities and class) with ``expected``."""
    from training.model.export import ParityError, check_parity

    if not answers:
        return 0.0
    got = np.array([[answer["probabilities"][c] for c in class_names] for answer in answers])
    try:
        return check_parity(got, expected, what, classes=[answer["class_id"] for answer in answers])
    except ParityError as exc:
        problems.append(str(exc))
        return 0.0


def check_answers(url: str, images: np.ndarray, expected: np.ndarray, class_names: list[str],
                  lineage: dict[str, str], budget_ms: float) -> Check:
    """Send ``images`` to ``url`` one by one and the first :data:`BATCH_IMAGES` in one batch; raise
    :class:`ServedArtifactError` unless every answer matches ``expected`` and carries ``lineage``."""
    import requests

    from serving.settings import client_headers

    bodies, problems, latencies, single = [png(image) for image in images], [], [], {}
    n = min(BATCH_IMAGES, len(bodies))
    with requests.Session() as http:
        http.headers.update(client_headers())
        for i, body in enumerate(bodies):
            started = time.perf_counter()
            answers = _ask(http, url, "/predict", "file", [body], lineage, problems, f"/predict image {i}")
            latencies.append((time.perf_counter() - started) * 1000)
            if answers:
                single[i] = answers[0]
        batch = _ask(http, url, "/predict_batch", "files", bodies[:n], lineage, problems, "/predict_batch")
    if batch and len(batch) != n:
        problems.append(f"/predict_batch: {len(batch)} answers to {n} images")
    answered = sorted(single)
    worst = max(_compare("/predict", [single[i] for i in answered], expected[answered], class_names, problems),
                _compare("/predict_batch", batch[:n], expected[:len(batch[:n])], class_names, problems))
    p99 = float(np.percentile(latencies, 99))
    if p99 > budget_ms:
        problems.append(f"p99 latency {p99:.1f} ms over the budget of {budget_ms:g} ms (served_p99_budget_ms)")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ServedArtifactError(f"{url}: {len(problems)} problem(s) with {len(images)} golden images: {shown}")
    return Check(len(bodies) + 1, p99, worst)


def _expected(config: PipelineConfig, run_id: str, prepared_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The golden images, the exported model's probabilities for them, and its class names."""
    from training.model.export import onnx_probabilities
    from training.registry.evaluation import onnx_of_run

    images = golden_set(prepared_dir, GOLDEN_IMAGES, config.seed)
    with tempfile.TemporaryDirectory() as tmp:
        session, class_names = onnx_of_run(run_id, Path(tmp))
        return images, onnx_probabilities(session, images), class_names


def _serve_and_check(config: PipelineConfig, bento, lineage: dict[str, str], golden) -> dict[str, Check]:
    """Each served artifact's :class:`Check`: the Bento, and its image when containerize built one."""
    from training.packaging import container

    log_path = config.state_path / "logs" / "verify" / f"bento-{bento.tag.version}.log"
    image, port = f"{container.IMAGE_NAME}:{bento.tag.version}", free_port()
    checks = {}
    # The server inherits BENTOML_HOME, which use_bentoml_home set to the store the Bento was built in.
    with running_server(bentoml_serve(str(bento.tag), port), log_path, port, START_TIMEOUT_S) as url:
        checks["bento"] = check_answers(url, *golden, lineage, config.served_p99_budget_ms)
    if container.image_exists(config, image):
        with container.serve_image(config, image, free_port(), timeout=START_TIMEOUT_S) as url:
            checks["image"] = check_answers(url, *golden, lineage, config.served_p99_budget_ms)
    else:
        log.info("no image %s (containerize was skipped): checking the Bento only", image)
    return checks


def verify(config: PipelineConfig, version_uri: str, bento_tag: str, prepared_dir: Path) -> str:
    """The served-artifact gate for ``bento_tag`` (model version ``version_uri``); returns ``bento_tag``.

    The image ``<IMAGE_NAME>:<bento version>`` is checked too when containerize built it.
    On failure the version is tagged ``failed_serving`` with the reason, and the error is raised.
    """
    from mlflow.entities import Metric

    from serving.lineage import lineage_headers
    from training.packaging.bento import bento_model_tag, use_bentoml_home
    from training.registry.promotion import client_for, mark_failed_serving, split_uri

    name, version = split_uri(version_uri)
    client = client_for(config)
    mv = client.get_model_version(name, version)
    images, expected, class_names = _expected(config, mv.run_id, prepared_dir)
    bento = use_bentoml_home(config).bentos.get(bento_tag)
    # What the registry says this version is, not what the Bento says of itself.
    labels = {"mlflow_model": name, "mlflow_version": str(version), "mlflow_run_id": mv.run_id}
    lineage = lineage_headers(labels, bento_model_tag(bento), str(bento.tag))
    try:
        checks = _serve_and_check(config, bento, lineage, (images, expected, class_names))
    except Exception as exc:  # any failure of the check keeps the model from being promoted
        reason = f"served-artifact check of {bento_tag} failed: {exc}"
        mark_failed_serving(config, version_uri, reason[:5000])
        raise ServedArtifactError(f"{reason}\nchampion was not moved; the served model is unchanged.") from exc
    now_ms = int(time.time() * 1000)
    client.log_batch(mv.run_id, metrics=[Metric(f"served_{kind}_{key}", value, now_ms, 0)
                                         for kind, check in checks.items()
                                         for key, value in (("p99_ms", check.p99_ms),
                                                            ("max_abs_diff", check.max_abs_diff))])
    for kind, check in checks.items():
        log.info("served-artifact check of the %s passed: %d golden images, p99 %.1f ms (budget %g ms), "
                 "max |p - exported| %.2e", kind, check.requests - 1, check.p99_ms, config.served_p99_budget_ms,
                 check.max_abs_diff)
    client.set_model_version_tag(name, version, "served_check", f"passed: {', '.join(checks)}; p99 "
                                 f"{max(c.p99_ms for c in checks.values()):.1f} ms")
    return bento_tag
