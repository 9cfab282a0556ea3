"""The picture of a served model's checks: drift score against the threshold, and the class mix, over time."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path


def plot_history(history: dict[str, list[tuple[float, float]]], threshold: float, path: Path) -> Path:
    """Draw ``history`` (metric → [(unix seconds, value)]) into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    import matplotlib.pyplot as plt

    def times(points):
        return [datetime.fromtimestamp(t, tz=timezone.utc) for t, _ in points]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, constrained_layout=True)
    score = history.get("drift_score", [])
    top.plot(times(score), [v for _, v in score], marker=".", label="drift score (worst worker)")
    top.axhline(threshold, color="tab:red", linestyle="--", label=f"drift_threshold {threshold:g}")
    at = dict(score)
    events = [(t, at.get(t, threshold)) for t, v in history.get("drift_event", []) if v]
    if events:
        top.scatter(times(events), [v for _, v in events], color="tab:red", s=60, zorder=3, label="drift event")
    top.set_ylim(0, 1)
    top.set_ylabel("drift score")
    top.legend(loc="upper left", fontsize="small")
    shares = {k.removeprefix("class_share_"): v for k, v in sorted(history.items()) if k.startswith("class_share_")}
    if shares:
        # Checks with no answers have no share; draw each class only where it was measured.
        stamps = sorted({t for points in shares.values() for t, _ in points})
        values = [[dict(points).get(t, 0.0) for t in stamps] for points in shares.values()]
        bottom.stackplot([datetime.fromtimestamp(t, tz=timezone.utc) for t in stamps], values, labels=list(shares))
        bottom.legend(loc="upper left", fontsize="x-small", ncol=5)
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("share of answers since the last check")
    bottom.set_xlabel("check time (UTC)")
    fig.suptitle("Served model: input drift and predicted classes")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
