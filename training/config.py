"""One frozen configuration for the whole pipeline.

Every default lives here, with a comment saying why. Values are overridden, in
increasing priority, by environment variables (``CIFAR10_<FIELD>``, upper case)
and by explicit overrides (the Airflow DAG passes its params). Nothing here reads
the environment at import time: call :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

# The official binary release: parsed with numpy, never unpickled.
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
OFFICIAL_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"

ENV_PREFIX = "CIFAR10_"
# Standard variables of the tools themselves, honoured when the CIFAR10_ one is unset,
# so a deployment configures MLflow and BentoML the way their docs say.
ENV_ALIASES = {"mlflow_tracking_uri": "MLFLOW_TRACKING_URI", "bentoml_home": "BENTOML_HOME"}

# Named training presets: field values applied on top of the defaults, below env and
# overrides. "default" is the dataclass defaults themselves.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    # Half the default's widths, and as many epochs as fit a 5-minute budget on 2 CPU cores
    # with bf16 (docs/results.md has the measured times).
    "quick": {"widths": "32,64,64", "epochs": 6},
    # airbench94's full widths and epochs: far too slow for a CPU; meant for the GPU
    # (KERAS_BACKEND=jax, docs/gpu.md).
    "airbench94": {"widths": "64,256,256", "epochs": 10, "batch_size": 1024, "learning_rate": 1.5},
    # Seconds on a few hundred synthetic images: exercises every code path, learns little.
    "tiny": {"widths": "8,16,16", "epochs": 2, "batch_size": 32, "learning_rate": 0.2},
}


@dataclass(frozen=True)
class PipelineConfig:
    """All knobs of the pipeline. Pass it explicitly; never read globals."""

    # --- where state lives -------------------------------------------------
    # One folder for everything local: data cache, MLflow store, BentoML home.
    state_dir: str = ".state"
    # MLflow tracking URI; empty means SQLite inside state_dir (embedded default).
    mlflow_tracking_uri: str = ""
    # Where MLflow artifacts go when we create the experiment; empty means
    # state_dir/mlflow/artifacts. Set to s3://bucket/prefix for S3.
    mlflow_artifact_location: str = ""
    experiment_name: str = "cifar10"
    # BentoML store (models and Bentos); empty means state_dir/bentoml. The
    # BENTOML_HOME environment variable, when set, wins (BentoML reads it).
    bentoml_home: str = ""

    # --- data --------------------------------------------------------------
    data_url: str = OFFICIAL_URL
    # The only folders a file:// data_url or a plain path may read from, separated like PATH
    # (os.pathsep); empty means state_dir/data. Whoever triggers a run chooses data_url, so
    # without this limit a run could copy any file the worker can read into its artifacts.
    data_roots: str = ""
    # Expected checksum "sha256:<hex>" or "md5:<hex>" (bare hex = sha256).
    # Empty: the official URL's known checksum applies, others are not checked.
    data_checksum: str = ""
    # Fractions of all images held out; the rest is training data. When the
    # archive brings its own test split, test_fraction is not used.
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    # Cap on training images (0 = all), for quick runs; stratified.
    max_train_images: int = 0
    # Processes that decode images in the prepare step; 0 = one per CPU this
    # process may use (decoding 50,000 JPEGs is CPU-bound; 1 = in-process).
    decode_workers: int = 0
    seed: int = 42

    # --- model and training ------------------------------------------------
    # A named preset (see RECIPES) applied before env vars and overrides, which win:
    # "default" (a 20-minute budget on 2 CPU cores with bf16), "quick" (5 minutes),
    # "airbench94" (GPUs) or "tiny" (seconds; for tests).
    recipe: str = "default"
    # Channel widths of the conv groups (comma separated). airbench94 uses 64,256,256;
    # half the width in the last two groups buys more epochs within a CPU budget, which
    # short runs need more than width.
    widths: str = "64,128,128"
    # As many epochs as fit the 20-minute budget on 2 CPU cores with native bf16 when the
    # machine is slow (docs/results.md; recheck with `python -m bench.bench_train`). The
    # recipe is short of compute, not capacity: each epoch up to here still bought accuracy.
    # A CPU without native bf16 trains in float32 at a fraction of the speed: there 6 fit.
    epochs: int = 15
    # Smaller than airbench's 1024: a short CPU run needs optimizer steps more than a
    # GPU-sized batch (smaller still was slower per epoch). The GPU preset keeps 1024.
    batch_size: int = 256
    # Peak learning rate of Nesterov SGD on the mean loss: airbench's 11.5 per 1024
    # summed examples is 1.5 at batch 1024; scaled linearly with the batch. The schedule
    # warms up from 0.2x over 23% of the steps and decays linearly to 0.07x.
    learning_rate: float = 0.375
    # Train in mixed_bfloat16: "auto" (on where TensorFlow runs on a CPU with native bf16
    # instructions, avx512_bf16 or AMX, where a step is markedly faster; off elsewhere: CPUs
    # with only AVX2 emulate bf16 many times slower, and on a GPU the jitted loop's longer
    # compile outweighs its faster steps), "true" or "false". Evaluation and the exported
    # model are float32 either way.
    mixed_precision: str = "auto"
    # Flip test-time augmentation inside the exported model (2x inference cost).
    tta: bool = True

    # --- failures and retries ------------------------------------------------
    # Airflow retries of every task and the wait before each retry. Airflow needs them
    # when it parses the DAG file, so they come from CIFAR10_* variables of the process
    # that parses it (a DAG param cannot change them).
    task_retries: int = 1
    retry_delay_seconds: float = 30.0

    # --- registry gate -----------------------------------------------------
    registered_model_name: str = "cifar10-cnn"
    # A new version becomes champion only at or above this test accuracy and
    # min_improvement above the current champion's. The margin is above 0 so that a
    # retrain that merely ties (the same data and seed give the same model) does not
    # rebuild and redeploy what is already served.
    min_accuracy: float = 0.0
    min_improvement: float = 0.002
    force_promote: bool = False
    # The served-artifact gate: the p99 latency of the golden images, one request at a time, must
    # stay within this. Loose enough for a busy 2-core build machine, tight enough to catch a
    # service that runs the model many times slower than it should (e.g. per-request loads).
    served_p99_budget_ms: float = 250.0

    # --- serving and packaging ---------------------------------------------
    # docker | podman | buildah | auto (first healthy one) | none (skip)
    container_backend: str = "auto"
    # Base of the Bento image; "" = by backend (docker: the registry's python:3.11-slim-bookworm,
    # podman/buildah: the local debootstrap base).
    base_image: str = ""
    # Further base images (comma separated) that base_image may name besides those two defaults.
    # An image pinned by digest (name@sha256:<64 hex digits>) is accepted without being listed:
    # its content cannot change under the name. Anything else could put any code into the image.
    allowed_base_images: str = ""
    # Where the publish task exports the built Bento (models inside), e.g. s3://bucket/bentos/, so a
    # serving machine imports it into its own store; "" = keep it in the local store only.
    bento_export_uri: str = ""

    # --- drift monitoring (the cifar10_drift_monitor DAG) -------------------
    # The service the monitor scrapes (/metrics, /metadata); in compose, the bento container.
    monitor_url: str = "http://localhost:3000"
    # A worker's drift score (0: its recent images look like the training data, 1: nothing
    # alike) at or above this calls for retraining. On CIFAR-10, windows of held-out images
    # score up to 0.15 (100 images), strongly blurred, inverted or noisy ones 0.35 and more
    # (0.29 and more from pixels alone, for a model without confidences) (docs/monitoring.md).
    drift_threshold: float = 0.25
    # Below this many images in a worker's window the score is noise, not evidence: in-distribution
    # windows of 50 score up to 0.2.
    drift_min_images: int = 100
    # After a drift event, no other for this long: retraining on data that has not changed
    # cannot fix drifted inputs, and one episode should not start a training every check.
    drift_cooldown_hours: float = 24.0

    # ----------------------------------------------------------------------
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
        """Artifact root for a new experiment; ``None`` lets a tracking server choose.

        A server started with ``--artifacts-destination`` proxies artifacts
        (``mlflow-artifacts:/``); a client-side ``file://`` root would bypass it and
        leave the artifacts on the training machine.
        """
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


def _coerce(values: Mapping[str, Any]) -> dict[str, Any]:
    types = {f.name: f.type for f in fields(PipelineConfig)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in types:
            raise ValueError(
                f"unknown config key {key!r}; valid keys: {', '.join(sorted(types))}"
            )
        kind = types[key]
        if value is None:
            continue
        try:
            if kind == "bool":
                out[key] = value if isinstance(value, bool) else str(value).strip().lower() in {"1", "true", "yes", "on"}
            elif kind == "int":
                out[key] = int(value)
            elif kind == "float":
                out[key] = float(value)
            else:
                out[key] = str(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config {key}={value!r} is not a valid {kind}: {exc}") from exc
    return out


def load_config(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> PipelineConfig:
    """Defaults, then the ``recipe`` preset, then ``CIFAR10_*`` environment variables, then ``overrides``.

    Unknown override keys raise ``ValueError`` naming the valid ones, so a typo in a
    DAG param cannot silently fall back to a default.
    """
    env = os.environ if environ is None else environ
    from_env = {name: env[alias] for name, alias in ENV_ALIASES.items() if env.get(alias)}
    from_env.update({
        f.name: env[ENV_PREFIX + f.name.upper()]
        for f in fields(PipelineConfig)
        if ENV_PREFIX + f.name.upper() in env
    })
    overrides = dict(overrides or {})
    recipe = str(overrides.get("recipe") or from_env.get("recipe") or PipelineConfig.recipe)
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
    config = PipelineConfig().replace(**RECIPES[recipe], recipe=recipe)
    config = config.replace(**from_env)
    return config.replace(**overrides) if overrides else config
