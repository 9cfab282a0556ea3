"""Pictures that make a training run explain itself: learning curves, confusion matrix, samples.

matplotlib is imported lazily with the Agg backend (no display on workers). Each
function writes one PNG and returns its path; nothing here talks to MLflow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts: rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Recall of each class (correct / images of that class) from a confusion matrix."""
    totals = matrix.sum(axis=1)
    return {name: float(matrix[i, i] / totals[i]) if totals[i] else float("nan")
            for i, name in enumerate(class_names)}


def learning_curves(history: dict[str, list[float]], path: Path) -> Path:
    """Loss and accuracy per epoch, training against validation, plus the learning rate."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key in zip(axes[:2], ("loss", "accuracy")):
        for prefix, style in (("", "-o"), ("val_", "-s")):
            values = history.get(prefix + key)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, ms=3, label=(prefix or "train_") + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    lr = history.get("learning_rate")
    if lr:
        axes[2].plot(range(1, len(lr) + 1), lr, "-o", ms=3)
    axes[2].set_xlabel("epoch")
    axes[2].set_title("learning rate (end of epoch)")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrix_plot(matrix: np.ndarray, class_names: list[str], path: Path) -> Path:
    """Row-normalised confusion matrix with counts in each cell."""
    plt = _pyplot()
    totals = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    share = matrix / totals
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"test confusion matrix (accuracy {accuracy:.4f})")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, path)


def sample_grid(images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str],
                path: Path, columns: int = 8) -> Path:
    """Test images with true and predicted labels; wrong predictions titled in red."""
    plt = _pyplot()
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k].astype(np.uint8), interpolation="nearest")
        ok = y_true[k] == y_pred[k]
        ax.set_title(f"{class_names[y_true[k]]}\n→ {class_names[y_pred[k]]}", fontsize=7,
                     color="black" if ok else "red")
    fig.suptitle("test samples: true → predicted (red = wrong)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path
