"""How far recent inputs are from the training data: a windowed drift score, numpy only.

Each image is summarised by a few 16-bin histograms that a shift in what cameras send changes:
its pixel intensities per channel, its local contrast (gradient magnitudes: blur lowers them,
noise raises them), its colour balance (red minus blue: inverted colours flip it) and, where
the reference has it, the model's confidence. :func:`reference_statistics` computes the
training data's histograms, which travel in the BentoML model's metadata; a
:class:`DriftWindow` keeps the last N served images' histograms and scores them against it.

The score is the largest of the groups' Jensen-Shannon distances (base 2: 0 is the same
distribution, 1 disjoint): a shift shows in one or two groups, and an average over all of
them would dilute it toward the noise of the others.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

BINS = 16
PIXEL_GROUPS = ("red", "green", "blue", "contrast", "colour")
CONFIDENCE = "confidence"
CONFIDENCE_EDGES = (0.5, 0.75, 0.9)  # unsure, hesitant, fairly sure, sure
REFERENCE_VERSION = 1


@functools.cache
def _luts() -> tuple[np.ndarray, np.ndarray]:
    """Bin of every possible gradient (0..765, channel sums) and red-minus-blue difference (-255..255).

    Log-spaced, because both are heavy near zero: most neighbouring pixels are alike.
    """
    import numpy as np

    grad = np.arange(766) / 3.0
    contrast = np.minimum(BINS - 1, (2 * np.log2(grad + 1)).astype(np.int64))
    diff = np.arange(-255, 256)
    level = np.minimum(BINS // 2 - 1, np.log2(np.abs(diff) + 1).astype(np.int64))
    colour = np.where(diff < 0, BINS // 2 - 1 - level, BINS // 2 + level)
    return contrast.astype(np.int32), colour.astype(np.int32)


def image_histograms(images: np.ndarray) -> np.ndarray:
    """Per-image counts, shape ``(n, len(PIXEL_GROUPS) * BINS)``, for uint8 images ``(n, 32, 32, 3)``.

    Every other row and column is enough for 16-bin histograms summed over a window of images,
    and a quarter of the pixels keeps the cost per served image in microseconds.
    """
    import numpy as np

    n = len(images)
    contrast_lut, colour_lut = _luts()
    x = np.asarray(images, dtype=np.uint8)
    sub = x[:, ::2, ::2, :]
    intensity = (sub >> 4).reshape(n, -1, 3).astype(np.int32) + np.array([0, BINS, 2 * BINS], dtype=np.int32)
    gray = x[..., 0].astype(np.int16) + x[..., 1] + x[..., 2]
    # Neighbours along every other row and every other column: blur and noise change these.
    grads = np.concatenate([np.abs(np.diff(gray[:, ::2, :], axis=2)).reshape(n, -1),
                            np.abs(np.diff(gray[:, :, ::2], axis=1)).reshape(n, -1)], axis=1)
    contrast = np.take(contrast_lut, grads) + 3 * BINS
    colour = np.take(colour_lut, sub[..., 0].astype(np.int16).reshape(n, -1) - sub[..., 2].reshape(n, -1) + 255)
    width = len(PIXEL_GROUPS) * BINS
    flat = np.concatenate([intensity.reshape(n, -1), contrast, colour + 4 * BINS], axis=1)
    flat += (np.arange(n, dtype=np.int32) * width)[:, None]
    return np.bincount(flat.ravel(), minlength=n * width).reshape(n, width)


def confidence_histograms(confidences: np.ndarray) -> np.ndarray:
    """One-hot rows ``(n, BINS)``: the bin of each image's top-class probability.

    Four bins (edges :data:`CONFIDENCE_EDGES`) of the sixteen: each image gives one value here, not
    hundreds as for its pixels, and sixteen bins of 50 values would score sampling noise as drift.
    """
    import numpy as np

    bins = np.searchsorted(CONFIDENCE_EDGES, np.asarray(confidences, dtype=np.float64), side="right")
    return np.eye(BINS, dtype=np.int64)[bins]


def reference_statistics(images: np.ndarray, confidences: np.ndarray | None = None) -> dict:
    """The reference a :class:`DriftWindow` scores against, JSON-serialisable.

    ``images``: training images, uint8 ``(n, 32, 32, 3)``; ``confidences``: the model's top-class
    probability on held-out images (the validation split), or ``None`` to leave confidence out.
    """
    import numpy as np

    counts = np.zeros(len(PIXEL_GROUPS) * BINS, dtype=np.int64)
    for start in range(0, len(images), 1024):  # bounded memory for 50,000 images
        counts += image_histograms(images[start:start + 1024]).sum(axis=0)
    groups = {name: _normalise(counts[i * BINS:(i + 1) * BINS]) for i, name in enumerate(PIXEL_GROUPS)}
    if confidences is not None and len(confidences):
        groups[CONFIDENCE] = _normalise(confidence_histograms(confidences).sum(axis=0))
    return {"version": REFERENCE_VERSION, "bins": BINS, "images": int(len(images)),
            "groups": {name: [round(float(p), 8) for p in hist] for name, hist in groups.items()}}


def _normalise(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else counts.astype(float)


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance, base 2, between two histograms (normalised here)."""
    import numpy as np

    p, q = _normalise(np.asarray(p, dtype=np.float64)), _normalise(np.asarray(q, dtype=np.float64))
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = lambda a: np.where(a > 0, a * np.log2(a / m), 0.0).sum()  # noqa: E731
        return float(np.sqrt(max(0.0, (kl(p) + kl(q)) / 2)))


class ReferenceError(ValueError):
    """The model's drift reference cannot be used."""


class DriftWindow:
    """The last ``size`` images' histograms, scored against a reference. Thread-safe."""

    def __init__(self, reference: dict, size: int):
        import numpy as np

        if reference.get("version") != REFERENCE_VERSION or reference.get("bins") != BINS:
            raise ReferenceError(f"drift reference version {reference.get('version')} with {reference.get('bins')} "
                                 f"bins: this service reads version {REFERENCE_VERSION} with {BINS} bins; "
                                 "retrain or re-import the model")
        groups = reference.get("groups", {})
        missing = [g for g in PIXEL_GROUPS if g not in groups]
        if missing:
            raise ReferenceError(f"drift reference lacks the groups {missing}; retrain or re-import the model")
        self.groups = PIXEL_GROUPS + ((CONFIDENCE,) if CONFIDENCE in groups else ())
        self.reference = np.array([groups[g] for g in self.groups], dtype=np.float64)
        # The first confidence bin is "under 0.5": how often the model was unsure on held-out images.
        self.low_confidence_share = float(groups[CONFIDENCE][0]) if CONFIDENCE in groups else None
        self.size = size
        self._rows: deque[np.ndarray] = deque()
        self._sum = np.zeros((len(self.groups), BINS), dtype=np.int64)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, images: np.ndarray, confidences: np.ndarray) -> float:
        """Add a batch of served images (uint8 NHWC) and their top-class probabilities; return the score."""
        import numpy as np

        rows = image_histograms(images)
        if CONFIDENCE in self.groups:
            rows = np.concatenate([rows, confidence_histograms(confidences)], axis=1)
        rows = rows.reshape(len(images), len(self.groups), BINS)[-self.size:]
        with self._lock:
            self._sum += rows.sum(axis=0)
            self._rows.extend(rows)
            while len(self._rows) > self.size:
                self._sum -= self._rows.popleft()
            window = self._sum.copy()
        return self.score(window)

    def score(self, window: np.ndarray | None = None) -> float:
        """The largest Jensen-Shannon distance of a group of the window to the reference's (0: empty window)."""
        if window is None:
            with self._lock:
                window = self._sum.copy()
        if not window.any():
            return 0.0
        return max(js_distance(w, r) for w, r in zip(window, self.reference))

    def distances(self) -> dict[str, float]:
        """Each group's distance: which statistic moved."""
        with self._lock:
            window = self._sum.copy()
        return {g: js_distance(w, r) for g, w, r in zip(self.groups, window, self.reference)}
