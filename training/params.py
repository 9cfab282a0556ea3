"""What whoever triggers a DAG run may set: each DAG's params, declared once.

The DAG's ``params=`` come from here (:meth:`RunParams.airflow`), and each task checks its run's conf
against the same declaration (:meth:`RunParams.config`): Airflow passes an undeclared conf key on as a
param of its own, so it must fail the task. Declared values are checked too (local data only under the
data roots, a base image allowlisted or pinned). Standard library only: the DAG files import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from serving.precision import PRECISIONS
from training.config import RECIPES, PipelineConfig, load_config
from training.deploy.shadow import MIN_JUDGED


class RunParamError(ValueError):
    """A run's conf or params are not what its DAG accepts."""


def _local_data_only(config: PipelineConfig) -> None:
    from training.data.fetch import check_source

    check_source(config.data_url, config.data_root_paths)


def _known_base_image(config: PipelineConfig) -> None:
    from training.packaging.container import check_base_image

    check_base_image(config.base_image, config)


@dataclass(frozen=True)
class RunParam:
    """One param a run may set; ``type`` is its JSON-schema type when set (unset: empty or null)."""

    name: str
    type: str  # "string", "integer", "number" or "boolean"
    description: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    enum: tuple[str, ...] = ()
    pattern: str | None = None
    # A check of the loaded config that this param's value must pass (raises ValueError).
    check: Callable[[PipelineConfig], None] | None = None

    def schema(self) -> dict[str, Any]:
        """The Airflow ``Param`` arguments: a string defaults to "", a boolean to False, a number to null."""
        if self.type == "string":
            kwargs: dict[str, Any] = {"default": "", "type": "string"}
        elif self.type == "boolean":
            kwargs = {"default": False, "type": "boolean"}
        else:
            kwargs = {"default": None, "type": ["null", self.type]}
        bounds = {"minimum": self.minimum, "maximum": self.maximum, "exclusiveMinimum": self.exclusive_minimum,
                  "pattern": self.pattern, "enum": ["", *self.enum] if self.enum else None}
        return {**kwargs, "description": self.description, **{k: v for k, v in bounds.items() if v is not None}}


@dataclass(frozen=True)
class RunParams:
    """A DAG's params: ``config`` ones override the PipelineConfig field of their name, ``task_args`` its tasks read."""

    config_params: tuple[RunParam, ...]
    task_args: tuple[RunParam, ...] = ()

    @property
    def names(self) -> list[str]:
        return [p.name for p in (*self.config_params, *self.task_args)]

    def airflow(self) -> dict[str, Any]:
        """The DAG's ``params=``."""
        from airflow.sdk import Param

        return {p.name: Param(**p.schema()) for p in (*self.config_params, *self.task_args)}

    def check_conf(self, conf: Mapping[str, Any] | None) -> None:
        """Raise :class:`RunParamError` naming the allowed keys when ``conf`` has a key that is not a param."""
        unknown = sorted(set(conf or {}) - set(self.names))
        if unknown:
            raise RunParamError(
                f"this run's conf sets {', '.join(map(repr, unknown))}, which this DAG does not take; the keys a run "
                f"may set are: {', '.join(self.names)}. Where state, the registry and exports live are the "
                "operator's CIFAR10_* settings, never a run's: trigger the run again without them")

    def config(self, conf: Mapping[str, Any] | None, params: Mapping[str, Any],
               environ: Mapping[str, str] | None = None) -> PipelineConfig:
        """The environment's config with the declared params that are set over it; :class:`RunParamError`
        for an undeclared conf key or a refused value."""
        self.check_conf(conf)
        overrides = {p.name: params[p.name] for p in self.config_params if params.get(p.name) not in (None, "")}
        try:
            config = load_config(overrides, environ)
            for param in self.config_params:
                if param.check is not None:
                    param.check(config)
        except ValueError as exc:
            raise RunParamError(str(exc)) from exc
        return config

    def for_task(self, context: Mapping[str, Any]) -> PipelineConfig:
        """:meth:`config` for the running Airflow task; a refusal fails it without retries (they would fail alike)."""
        from airflow.sdk.exceptions import AirflowFailException

        try:
            return self.config(context["dag_run"].conf, context["params"])
        except RunParamError as exc:
            raise AirflowFailException(str(exc)) from exc


PIPELINE = RunParams(config_params=(
    RunParam("data_url", "string", "Dataset URL: http(s)://, s3://, or a file:// URL or path under the operator's data "
                                   "roots (CIFAR10_DATA_ROOTS). Empty: CIFAR10_DATA_URL or the official release.",
             check=_local_data_only),
    RunParam("data_checksum", "string", "Expected sha256:<hex> or md5:<hex>; empty: none (the official URL's is "
                                        "built in)"),
    RunParam("recipe", "string", "Training preset: default (~20 min on 2 cores), quick (~5 min) or tiny (tests); "
                                 "fields set here or in env win", enum=tuple(RECIPES)),
    RunParam("epochs", "integer", "Training epochs", minimum=1),
    RunParam("batch_size", "integer", "Batch size", minimum=1),
    RunParam("seed", "integer", "Seed for split, init and augmentation"),
    RunParam("max_train_images", "integer", "Cap on training images (0 = all)", minimum=0),
    RunParam("val_fraction", "number", "Fraction of the images held out for validation", minimum=0, maximum=0.5),
    RunParam("test_fraction", "number", "Fraction of the images held out for testing", minimum=0, maximum=0.5),
    RunParam("widths", "string", "Conv block widths, e.g. 32,64,128", pattern=r"^([1-9][0-9]*(,[1-9][0-9]*)*)?$"),
    RunParam("min_accuracy", "number", "Quality gate: minimum test accuracy for champion", minimum=0, maximum=1),
    RunParam("min_improvement", "number", "Quality gate: how much a new model must beat the champion's test accuracy "
                                          "by (a tie never replaces it)", minimum=0, maximum=1),
    RunParam("force_promote", "boolean", "Operator override of the gate"),
    RunParam("served_p99_budget_ms", "number", "Served-artifact gate: p99 latency budget of the golden set",
             exclusive_minimum=0),
    RunParam("shadow_share", "number", "Share of live /predict requests mirrored to a new version before it becomes "
                                       "champion, where a front door serves (0: no shadow)", minimum=0, maximum=1),
    RunParam("shadow_requests", "integer", "Shadow window: mirrored answers judged", minimum=MIN_JUDGED),
    RunParam("shadow_minutes", "number", "Shadow window: longest duration in minutes (the follower waits on it)",
             exclusive_minimum=0, maximum=24 * 60),
    RunParam("shadow_min_agreement", "number", "Shadow: least share of answers with the champion's class",
             minimum=0, maximum=1),
    RunParam("shadow_max_p99_ratio", "number", "Shadow: most its p99 latency may be over the champion's",
             exclusive_minimum=0),
    RunParam("precision", "string", "Served precision: auto (int8 only where it keeps float's answers and is faster "
                                    "where the Bento runs), float or int8", enum=PRECISIONS),
    RunParam("container_backend", "string", "auto | docker | podman | buildah | none",
             enum=("auto", "docker", "podman", "buildah", "none")),
    RunParam("base_image", "string", "Base of the Bento image: a default, one the operator allows "
                                     "(CIFAR10_ALLOWED_BASE_IMAGES) or any pinned by digest (IMAGE@sha256:...); "
                                     "empty: by backend (docker: python:3.11-slim-bookworm, else a local base)",
             check=_known_base_image),
))

ROLLBACK = RunParams(config_params=(), task_args=(
    RunParam("version", "integer", "Model version to serve; empty: the previous champion", minimum=1),
    RunParam("reason", "string", "Why (recorded with the move); required with force"),
    RunParam("force", "boolean", "Roll back even to a version that failed the served-artifact check or lost the "
                                 "quality gate (give the reason)"),
))

MONITOR = RunParams(config_params=(
    RunParam("drift_threshold", "number", "Drift score (0-1) at or above which the model is retrained",
             minimum=0, maximum=1),
    RunParam("drift_min_images", "integer", "Fewest images in a worker's window for its score to count", minimum=1),
    RunParam("drift_cooldown_hours", "number", "No new drift event this long after the last one", minimum=0),
))
