"""One check of the served model: scrape, decide whether drift calls for retraining, record it.

Each check is a step of one MLflow run per served Bento in ``<experiment_name>-monitoring``: drift score,
window sizes, the class mix and confidence since the previous check, the decision; ``drift.png`` redrawn.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from training.config import PipelineConfig
from training.monitor.metrics import Observation, scrape

log = logging.getLogger(__name__)

EXPERIMENT_SUFFIX = "monitoring"
PLOT = "drift.png"


@dataclass(frozen=True)
class Decision:
    drifted: bool  # the evidence says the inputs drifted
    retrain: bool  # and a drift event is due (not within the cooldown of the last one)
    reason: str


def decide(config: PipelineConfig, observation: Observation, last_event_at: datetime | None,
           now: datetime) -> Decision:
    """Drifted when a worker with ``drift_min_images`` images scores at least ``drift_threshold``."""
    score = observation.drift_score(config.drift_min_images)
    if score is None:
        return Decision(False, False, f"no worker holds drift_min_images={config.drift_min_images} images yet "
                                      f"(the fullest window: {observation.window_images}): too few to judge")
    if score < config.drift_threshold:
        return Decision(False, False, f"drift score {score:.3f} is under drift_threshold {config.drift_threshold:g}")
    cooldown = timedelta(hours=config.drift_cooldown_hours)
    if last_event_at is not None and now - last_event_at < cooldown:
        return Decision(True, False, f"drift score {score:.3f} >= drift_threshold {config.drift_threshold:g}, but "
                                     f"the last drift event was at {last_event_at:%Y-%m-%d %H:%M:%S} UTC, within "
                                     f"drift_cooldown_hours={config.drift_cooldown_hours:g}: no new event")
    return Decision(True, True, f"drift score {score:.3f} >= drift_threshold {config.drift_threshold:g} "
                                f"({observation.window_images} images in the window): retraining")


def _since(now: float, before: float | None) -> float:
    """How much a cumulative count grew since the last check; all of it after a restart reset it."""
    return now if before is None or now < before else now - before


def interval_metrics(observation: Observation, previous: dict[str, float]) -> dict[str, float]:
    """Counts as they are now, and the class mix and confidence of the answers since ``previous``."""
    out = {f"predictions_total_{c}": n for c, n in observation.predictions.items()}
    out.update(confidence_count=observation.confidence_count, confidence_sum=observation.confidence_sum,
               low_confidence_total=observation.low_confidence)
    restarted = any(n < previous.get(k, 0.0) for k, n in out.items())
    base = {} if restarted else previous
    new = {c: _since(n, base.get(f"predictions_total_{c}")) for c, n in observation.predictions.items()}
    answered = sum(new.values())
    out["predictions_interval"] = answered
    if answered:
        out.update({f"class_share_{c}": n / answered for c, n in new.items()})
    count = _since(observation.confidence_count, base.get("confidence_count"))
    if count:
        out["confidence_mean"] = _since(observation.confidence_sum, base.get("confidence_sum")) / count
        out["low_confidence_share"] = _since(observation.low_confidence, base.get("low_confidence_total")) / count
    return out


def _run_for(client, config: PipelineConfig, observation: Observation):
    """This Bento's monitoring run, made at its first check."""
    from training.registry.tracking import side_experiment

    experiment_id = side_experiment(client, config, EXPERIMENT_SUFFIX)
    bento = observation.bento_tag or "unknown"
    runs = client.search_runs([experiment_id], filter_string=f"tags.bento_tag = '{bento}'", max_results=1)
    if runs:
        return runs[0]
    run = client.create_run(experiment_id, run_name=f"serving {bento}", tags={
        "bento_tag": bento, "mlflow_model_version": observation.model_version, "monitor_url": config.monitor_url})
    client.set_terminated(run.info.run_id)  # a record added to at each check, not a job in progress
    return client.get_run(run.info.run_id)


def record(config: PipelineConfig, observation: Observation, decision: Decision) -> str:
    """Log one check to this Bento's monitoring run and redraw its plot; return the run id."""
    from mlflow.entities import Metric

    from training.registry.promotion import client_for

    client = client_for(config)
    run = _run_for(client, config, observation)
    previous = run.data.metrics
    step = int(previous.get("check", 0)) + 1
    values = {"check": step, "window_images": observation.window_images,
              "workers_judged": len(observation.evidence(config.drift_min_images)),
              "drifted": float(decision.drifted), "drift_event": float(decision.retrain),
              **interval_metrics(observation, previous)}
    score = observation.drift_score(config.drift_min_images)
    if score is not None:
        values["drift_score"] = score
    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now_ms, step) for k, v in values.items()])
    client.set_tag(run.info.run_id, "last_check", decision.reason[:5000])
    _redraw(client, run.info.run_id, config.drift_threshold)
    return run.info.run_id


def _redraw(client, run_id: str, threshold: float) -> None:
    from training.monitor.report import plot_history

    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("class_share_")]
    history = {k: [(m.timestamp / 1000, m.value) for m in client.get_metric_history(run_id, k)]
               for k in ["drift_score", "drift_event", *keys]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PLOT
        plot_history(history, threshold, path)
        client.log_artifact(run_id, str(path))


def observe(config: PipelineConfig, last_event_at: datetime | None = None) -> str:
    """Scrape ``monitor_url``, record the check, and return its run's URI when it calls for retraining, else ``""``.

    ``last_event_at`` is when the last drift event was emitted (for ``drift_cooldown_hours``).
    """
    observation = scrape(config.monitor_url.rstrip("/"))
    decision = decide(config, observation, last_event_at, datetime.now(timezone.utc))
    run_id = record(config, observation, decision)
    log.info("%s is served; %s", observation.bento_tag or "an unnamed Bento", decision.reason)
    return f"runs:/{run_id}" if decision.retrain else ""


def event_extra(config: PipelineConfig, run_uri: str) -> dict:
    """What a drift event carries: the evidence, the served model and where the check is recorded."""
    from training.registry.promotion import client_for

    run = client_for(config).get_run(run_uri.removeprefix("runs:/"))
    score = run.data.metrics.get("drift_score", math.nan)
    return {"drift_score": round(score, 4), "drift_threshold": config.drift_threshold,
            "window_images": int(run.data.metrics.get("window_images", 0)),
            "bento_tag": run.data.tags.get("bento_tag", ""),
            "mlflow_model_version": run.data.tags.get("mlflow_model_version", ""), "monitoring_run": run_uri}
