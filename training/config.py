"""One frozen configuration for the whole pipeline: defaults, then the ``recipe`` preset, then
``CIFAR10_<FIELD>`` environment variables, then explicit overrides (a DAG run's params).

Nothing reads the environment at import time: call :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

from serving.precision import PRECISIONS

# The official binary release: parsed with numpy, never unpickled.
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
OFFICIAL_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"

ENV_PREFIX = "CIFAR10_"
# The tools' own variables count when the CIFAR10_ one is unset, so MLflow and BentoML are set up as their docs say.
ENV_ALIASES = {"mlflow_tracking_uri": "MLFLOW_TRACKING_URI", "bentoml_home": "BENTOML_HOME"}

# Training presets, applied over the defaults and under the environment and overrides (docs/results.md: their times).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},  # 20 minutes on 2 CPU cores with bf16
    "quick": {"widths": "32,64,64", "epochs": 6},  # 5 minutes on 2 CPU cores with bf16
    "airbench94": {"widths": "64,256,256", "epochs": 10, "batch_size": 1024, "learning_rate": 1.5},  # a GPU
    "tiny": {"widths": "8,16,16", "epochs": 2, "batch_size": 32, "learning_rate": 0.2},  # tests: every path, seconds
}


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting of the pipeline; passed explicitly, never read from globals."""

    # --- where state lives
    state_dir: str = ".state"  # everything local: data cache, MLflow store, BentoML home
    mlflow_tracking_uri: str = ""  # "": SQLite in state_dir
    mlflow_artifact_location: str = ""  # of a new experiment, e.g. s3://bucket/prefix; "": state_dir or the server's
    experiment_name: str = "cifar10"  # MLflow experiment of the training runs (and -champion, -monitoring)
    bentoml_home: str = ""  # BentoML store; "": state_dir/bentoml (BENTOML_HOME wins)

    # --- data
    data_url: str = OFFICIAL_URL  # http(s)://, s3://, file:// or a path
    # Folders (os.pathsep-separated) a local data_url may be under; "": state_dir/data. Runs choose data_url.
    data_roots: str = ""
    data_checksum: str = ""  # "sha256:<hex>" or "md5:<hex>"; "": the official release's, others unchecked
    val_fraction: float = 0.1  # of all images
    test_fraction: float = 0.2  # of all images, unless the archive brings a test split
    max_train_images: int = 0  # stratified cap for quick runs; 0: all
    decode_workers: int = 0  # processes decoding images; 0: one per usable CPU, 1: in-process
    seed: int = 42  # splits, initialisation, shuffling and augmentation

    # --- model and training
    recipe: str = "default"  # a preset of RECIPES; fields set in the environment or a run win
    widths: str = "64,128,128"  # conv groups; half airbench94's last two buys epochs on a CPU budget
    epochs: int = 15  # what fits 20 minutes on 2 cores with bf16 in a slow hour (6 in float32)
    batch_size: int = 256  # a short CPU run needs steps more than airbench's GPU-sized 1024
    learning_rate: float = 0.375  # peak of the triangle schedule: airbench's 1.5 at batch 1024, scaled linearly
    # mixed_bfloat16: "auto" (only where TensorFlow has a CPU with native bf16), "true" or "false"
    mixed_precision: str = "auto"
    tta: bool = True  # flip test-time augmentation inside the exported model (2x inference)
    # Served precision: auto (int8 where it keeps float's answers and is faster where the Bento runs), float, int8.
    precision: str = "auto"

    # --- registry gate
    registered_model_name: str = "cifar10-cnn"  # MLflow registered model; its alias "champion" is what is served
    min_accuracy: float = 0.0  # a new champion's least test accuracy
    min_improvement: float = 0.002  # over the champion's, above 0 so that a retrain that ties redeploys nothing
    force_promote: bool = False  # the operator's override of the gate
    served_p99_budget_ms: float = 250.0  # served-artifact gate: loose for a busy build machine, catches a slow model
    # Shadow: where a front door serves the champion, a promoted version first answers a share of live requests
    # beside it as "challenger" (clients get the champion's answers) and becomes champion only if these hold.
    shadow_share: float = 0.25  # of /predict requests mirrored to it; 0: no shadow, champion moves at once
    shadow_requests: int = 200  # the window ends at this many mirrored answers ...
    shadow_minutes: float = 15.0  # ... or after this long, whichever comes first
    # Its class equals the champion's on this share: the quick recipe's model agrees with the default one's on 87%
    # (81.5% in the worst 1% of 200-request windows); an untrained one on about 10%.
    shadow_min_agreement: float = 0.75
    # Its p99 latency over the champion's, both timed by nginx in the window: the champion's own model as
    # challenger on 2 shared cores measured 1.00-2.00 in ~150-request windows, a slow one is several times that.
    shadow_max_p99_ratio: float = 3.0

    # --- serving and packaging
    container_backend: str = "auto"  # docker | podman | buildah | auto (the first healthy) | none (skip)
    base_image: str = ""  # of the Bento image; "": by backend (docker: python slim, else the local debootstrap base)
    # Further base images (comma separated) base_image may name: any other could put any code into the image.
    allowed_base_images: str = ""
    bento_export_uri: str = ""  # where publish exports the Bento, e.g. s3://bucket/bentos/; "": local store only

    # --- drift monitoring (the cifar10_drift_monitor DAG; docs/monitoring.md chose the values)
    monitor_url: str = "http://localhost:3000"  # the service it scrapes
    drift_threshold: float = 0.25  # a worker's score that calls for retraining: above any in-distribution window
    drift_min_images: int = 100  # fewer images in a worker's window are noise, not evidence
    drift_cooldown_hours: float = 24.0  # retraining on unchanged data cannot fix drifted inputs

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser().resolve()

    @property
    def data_dir(self) -> Path:
        return self.state_path / "data"

    @property
    def data_root_paths(self) -> tuple[Path, ...]:
        """The folders local data may come from, resolved (links followed)."""
        roots = [Path(p).expanduser().resolve() for p in self.data_roots.split(os.pathsep) if p.strip()]
        return tuple(roots) or (self.data_dir,)

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.state_path / 'mlflow' / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str | None:
        """Artifact root for a new experiment; ``None`` lets a tracking server choose (a local
        ``file://`` root would bypass its ``--artifacts-destination``)."""
        if self.mlflow_artifact_location:
            return self.mlflow_artifact_location
        if self.tracking_uri.startswith(("http://", "https://")):
            return None
        return (self.state_path / "mlflow" / "artifacts").as_uri()

    @property
    def bentoml_home_path(self) -> Path:
        return Path(self.bentoml_home).expanduser().resolve() if self.bentoml_home else self.state_path / "bentoml"

    @property
    def width_tuple(self) -> tuple[int, ...]:
        return tuple(int(w) for w in str(self.widths).split(",") if w.strip())

    def replace(self, **changes: Any) -> "PipelineConfig":
        """A copy with ``changes`` applied and coerced to the field types."""
        return dataclasses.replace(self, **_coerce(changes))

    def as_params(self) -> dict[str, Any]:
        """Flat dict for MLflow params and logs; passwords inside URLs are masked."""
        return {k: mask_password(v) if isinstance(v, str) else v for k, v in dataclasses.asdict(self).items()}


def mask_password(value: str) -> str:
    """``scheme://user:secret@host/...`` -> ``scheme://user:***@host/...`` (credentials never logged)."""
    if "://" not in value or "@" not in value:
        return value
    parts = urlsplit(value)
    if parts.password is None:
        return value
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _to_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in {"1", "true", "yes", "on"}


CONVERTERS = {"bool": _to_bool, "int": int, "float": float, "str": str}


def _coerce(values: Mapping[str, Any]) -> dict[str, Any]:
    types = {f.name: f.type for f in fields(PipelineConfig)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in types:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(types))}")
        if value is None:
            continue
        try:
            out[key] = CONVERTERS[types[key]](value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config {key}={value!r} is not a valid {types[key]}: {exc}") from exc
    return out


def load_config(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> PipelineConfig:
    """Defaults, then the ``recipe`` preset, then ``CIFAR10_*`` variables, then ``overrides``.

    An unknown key raises ``ValueError`` naming the valid ones: a typo never falls back to a default.
    """
    env = os.environ if environ is None else environ
    from_env = {name: env[alias] for name, alias in ENV_ALIASES.items() if env.get(alias)}
    from_env |= {f.name: env[ENV_PREFIX + f.name.upper()] for f in fields(PipelineConfig)
                 if ENV_PREFIX + f.name.upper() in env}
    overrides = dict(overrides or {})
    recipe = str(overrides.get("recipe") or from_env.get("recipe") or PipelineConfig.recipe)
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
    config = PipelineConfig().replace(**RECIPES[recipe], recipe=recipe)
    config = config.replace(**from_env)
    config = config.replace(**overrides) if overrides else config
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision {config.precision!r}: use one of {', '.join(PRECISIONS)}")
    return config
