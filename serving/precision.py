"""Which of the model's two ONNX files a server runs: float32, or the int8 candidate where it earns its place.

Training judges whether int8 keeps float's answers (accuracy and agreement on the test split,
``training/model/quantize.py``) and records that with the ``precision`` setting in the BentoML
model's metadata. Whether int8 is faster depends on the CPU, and the host that trains is not always
the one that serves, so under ``auto`` the server measures both files here when it starts. The first
worker measures and writes the choice into a file kept for the model on this CPU (a ``flock``
serialises them), the others read it: every worker of one server serves the same precision, and so
does every later server of that model on this host until it restarts. A restart or a rollback then
answers as it did, even where the two speeds are close enough for a new measurement to tip the other
way.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

FLOAT_MODEL, INT8_MODEL = "model.onnx", "model.int8.onnx"
PRECISIONS = ("auto", "float", "int8")  # what the precision setting may say
MAX_ACCURACY_LOSS = 0.002  # 0.2 points of test accuracy
MIN_AGREEMENT = 0.99  # share of test images where int8's class is float's
MIN_SPEEDUP = 1.1  # "measurably faster": beyond the noise of a short measurement
MEASURE_S = 0.5  # per model: long enough to tell a 1.1x difference on a quiet core


@dataclass(frozen=True)
class Precision:
    served: str  # "float" or "int8"
    why: str
    float_img_s: float | None = None
    int8_img_s: float | None = None

    @property
    def file(self) -> str:
        return INT8_MODEL if self.served == "int8" else FLOAT_MODEL

    @property
    def other_file(self) -> str:
        return FLOAT_MODEL if self.served == "int8" else INT8_MODEL


def decide(setting: str, accurate: bool, float_img_s: float | None = None,
           int8_img_s: float | None = None) -> Precision:
    """The rule: int8 when ``setting`` forces it, or under ``auto`` when it keeps float's answers (``accurate``:
    test accuracy within MAX_ACCURACY_LOSS, agreement at least MIN_AGREEMENT) and is MIN_SPEEDUP times as fast."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision {setting!r}: use one of {', '.join(PRECISIONS)}")
    if setting != "auto":
        return Precision(setting, f"precision={setting} forces it", float_img_s, int8_img_s)
    if not accurate:
        return Precision("float", f"int8 loses more than {MAX_ACCURACY_LOSS * 100:.1f} points of test accuracy or "
                                  f"agrees with float on under {MIN_AGREEMENT:.0%} of the test images")
    if float_img_s is None or int8_img_s is None or int8_img_s < MIN_SPEEDUP * float_img_s:
        return Precision("float", f"int8 is not {MIN_SPEEDUP}x as fast here", float_img_s, int8_img_s)
    return Precision("int8", f"int8 keeps float's answers and is {int8_img_s / float_img_s:.2f}x as fast here",
                     float_img_s, int8_img_s)


def measurement_key(model_tag: str) -> str:
    """The key :func:`choose` keeps a measurement of ``model_tag`` under: the model, this CPU and its count."""
    import hashlib
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:  # not Linux
        pass
    identity = f"{model_tag}|{cpu or platform.processor()}|{os.cpu_count()}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def choose(model_dir: Path, metadata: dict, key: str, folder: Path | None = None) -> Precision:
    """The precision a server runs for the model in ``model_dir``; measured once per ``key``
    (:func:`measurement_key`)."""
    info = metadata.get("precision") or {}
    if not (model_dir / INT8_MODEL).exists():
        return Precision("float", "the model has no int8 candidate")
    setting, accurate = info.get("setting", "float"), bool(info.get("accurate"))
    if setting != "auto" or not accurate:
        return decide(setting, accurate)
    folder = Path(folder or ("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"))
    with open(folder / f"cifar10-precision-{key}.json", "a+") as shared:
        fcntl.flock(shared, fcntl.LOCK_EX)  # the other workers wait here while the first one measures
        shared.seek(0)
        if text := shared.read():
            return Precision(**json.loads(text))
        choice = decide(setting, accurate, *_speeds(model_dir))
        shared.write(json.dumps(asdict(choice)))
        return choice


def _speeds(model_dir: Path) -> tuple[float, float]:
    """Both files' images/s here: one thread each, on batches of 64, as the service runs them."""
    import numpy as np

    from serving.model import onnx_session

    batch = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)).astype(np.float32)
    speeds = []
    for name in (FLOAT_MODEL, INT8_MODEL):
        session = onnx_session(model_dir / name, threads=1)
        feed = {session.get_inputs()[0].name: batch}
        session.run(None, feed)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < MEASURE_S:
            session.run(None, feed)
            done += len(batch)
        speeds.append(done / (time.perf_counter() - start))
    return speeds[0], speeds[1]
