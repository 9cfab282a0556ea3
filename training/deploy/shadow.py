"""Shadow traffic: a challenger answers a share of live requests beside the champion before it may replace it.

Where a front door serves the champion (the follower's heartbeat on the registered model is fresh), the DAG's
promote step names the checked version ``challenger`` instead of moving ``champion`` (training/deploy/champion.py)
and records on it the thresholds of its run's config. The follower (training/deploy/follow.py) starts its Bento in
the idle slot and has nginx mirror a share of ``/predict`` requests to it (nginx's ``mirror``: the copy's answer is
dropped, clients get only the champion's). nginx writes both answers of each mirrored request to
``STACK_RUN/shadow.log``, one JSON line each, with the request id they share and the answer headers
(``X-Predicted-Class``, ``X-Confidence``); this module pairs them and judges the window:

- **agreement**: the share of requests the champion answered 200 for which the challenger gave the same class;
- **errors**: the share the challenger did not answer 200 (an error, a timeout) where the champion did;
- **latency**: the challenger's p99 over the champion's, both measured by nginx in the same window;
- **confidence**: the challenger's mean confidence beside the champion's (reported; agreement judges).

The figures are exported on the follower's ``/metrics`` (through the front door at ``/shadow/metrics``) and
logged to the challenger's MLflow run; ``champion`` moves only when they pass, else the version is marked
``failed_shadow`` with the figures as the reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Fewer judged requests than this say nothing: a window that ends with fewer (no traffic came) fails.
MIN_JUDGED = 30
# The challenger's answers that may fail where the champion's did not: any more is a broken model or server.
MAX_ERROR_SHARE = 0.01
# A mirrored request's answer is waited for this long; slower counts as an error (clients never wait for it:
# training/deploy/proxy.py relays the copy).
MIRROR_TIMEOUT_S = 5
# Answers waiting for their other half are dropped past this many (a line nginx never wrote).
MAX_PENDING = 10_000
# The first mirrored requests reach a Bento that has only just become ready and are slower than any after them
# (114 ms p99 against 26 ms in one ~150-request window on 2 cores): they are not judged.
WARMUP = 20
# The version's tags that carry its run's thresholds: each is named as its config field.
THRESHOLD_TAGS = ("shadow_share", "shadow_requests", "shadow_minutes", "shadow_min_agreement", "shadow_max_p99_ratio")


@dataclass(frozen=True)
class Thresholds:
    """A shadow window and what must hold at its end (the promoting run's config, recorded on the version)."""

    share: float
    requests: int
    minutes: float
    min_agreement: float
    max_p99_ratio: float

    @classmethod
    def from_config(cls, config) -> Thresholds:
        return cls(config.shadow_share, config.shadow_requests, config.shadow_minutes, config.shadow_min_agreement,
                   config.shadow_max_p99_ratio)

    def as_tags(self) -> dict[str, str]:
        return {tag: str(getattr(self, tag.removeprefix("shadow_"))) for tag in THRESHOLD_TAGS}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Thresholds:
        missing = [tag for tag in THRESHOLD_TAGS if tag not in tags]
        if missing:
            raise ValueError(f"the challenger's version lacks the tags {missing}: name it again with the promote step")
        return cls(float(tags["shadow_share"]), int(tags["shadow_requests"]), float(tags["shadow_minutes"]),
                   float(tags["shadow_min_agreement"]), float(tags["shadow_max_p99_ratio"]))


@dataclass(frozen=True)
class Answer:
    """One side of a mirrored request, as nginx logged it."""

    status: int
    label: str
    confidence: float | None
    seconds: float | None


def _number(text: str) -> float | None:
    # nginx writes "-" for a value it does not have, and "a, b" when it tried more than one upstream.
    try:
        return float(text.split(",")[-1].strip())
    except ValueError:
        return None


def parse(line: str) -> tuple[str, str, Answer] | None:
    """(request id, side, answer) of one shadow.log line; None for a line that is not one (a torn last line)."""
    try:
        record = json.loads(line)
        status = _number(record["status"])
        side, request_id = record["side"], record["id"]
    except (ValueError, KeyError, TypeError):
        return None
    if side not in ("champion", "challenger") or not request_id:
        return None
    return request_id, side, Answer(int(status or 0), record.get("class", ""), _number(record.get("confidence", "")),
                                    _number(record.get("time", "")))


@dataclass
class Window:
    """The pairs of one shadow window, read from shadow.log as nginx appends to it."""

    path: Path
    offset: int = 0
    pairs: list[tuple[Answer, Answer]] = field(default_factory=list)
    pending: dict[tuple[str, str], Answer] = field(default_factory=dict)
    warmup: int = WARMUP  # pairs still to skip

    @classmethod
    def starting_now(cls, path: Path, warmup: int = WARMUP) -> Window:
        """A window of what nginx logs from now on (earlier windows' lines, and the first ``warmup`` pairs, are
        skipped)."""
        return cls(path, path.stat().st_size if path.exists() else 0, warmup=warmup)

    def read(self) -> int:
        """Take in the lines appended since the last read; return how many pairs the window holds."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return len(self.pairs)
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line nginx is still writing waits for the next read
        self.offset += len(complete)
        for line in complete.decode("utf-8", "replace").splitlines():
            parsed = parse(line)
            if parsed is None:
                continue
            request_id, side, answer = parsed
            other = self.pending.pop((request_id, "challenger" if side == "champion" else "champion"), None)
            if other is None:
                if len(self.pending) >= MAX_PENDING:
                    self.pending.pop(next(iter(self.pending)))
                self.pending[(request_id, side)] = answer
            elif self.warmup:
                self.warmup -= 1
            else:
                self.pairs.append((answer, other) if side == "champion" else (other, answer))
        return len(self.pairs)


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# Each figure a window measures, and what it is (the follower's /metrics help texts).
FIGURES = {
    "requests": "Mirrored requests the champion answered 200",
    "agreement": "Share of them the challenger answered with the champion's class",
    "error_share": "Share of them the challenger did not answer 200 (errors, timeouts)",
    "p99_s": "The challenger's p99 latency in seconds, as nginx measured it",
    "champion_p99_s": "The champion's p99 latency on the same requests, in seconds",
    "confidence": "The challenger's mean confidence",
    "champion_confidence": "The champion's mean confidence on the same requests",
}


@dataclass(frozen=True)
class Figures:
    """What a window measured (:data:`FIGURES`); None where it has nothing to measure."""

    requests: int
    agreement: float | None
    error_share: float | None
    p99_s: float | None
    champion_p99_s: float | None
    confidence: float | None
    champion_confidence: float | None

    @classmethod
    def of(cls, pairs: list[tuple[Answer, Answer]]) -> Figures:
        judged = [(c, s) for c, s in pairs if c.status == 200]
        answered = [(c, s) for c, s in judged if s.status == 200]
        n = len(judged)
        return cls(
            requests=n,
            agreement=sum(c.label == s.label for c, s in answered) / n if n else None,
            error_share=(n - len(answered)) / n if n else None,
            p99_s=_p99([s.seconds for _, s in answered if s.seconds is not None]),
            champion_p99_s=_p99([c.seconds for c, _ in judged if c.seconds is not None]),
            confidence=_mean([s.confidence for _, s in answered if s.confidence is not None]),
            champion_confidence=_mean([c.confidence for c, _ in judged if c.confidence is not None]),
        )

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def judge(figures: Figures, thresholds: Thresholds) -> tuple[bool, str]:
    """Whether the challenger may become champion, and why, in one sentence with the figures."""
    f = figures
    if f.requests < MIN_JUDGED:
        return False, (f"only {f.requests} mirrored requests were answered by the champion in the window "
                       f"(at least {MIN_JUDGED} are needed to judge): name the version challenger again when "
                       "traffic comes, or promote it with shadow_share=0")
    ratio = (f.p99_s / f.champion_p99_s) if f.p99_s is not None and f.champion_p99_s else None
    failures = []
    if f.agreement < thresholds.min_agreement:
        failures.append(f"agreement {f.agreement:.3f} < {thresholds.min_agreement:g}")
    if f.error_share > MAX_ERROR_SHARE:
        failures.append(f"errors {f.error_share:.3f} > {MAX_ERROR_SHARE:g}")
    if ratio is None and f.error_share < 1:
        failures.append("no latency measured")
    elif ratio is not None and ratio > thresholds.max_p99_ratio:
        failures.append(f"p99 {f.p99_s * 1000:.0f} ms = {ratio:.2f}x the champion's > {thresholds.max_p99_ratio:g}x")
    confidence = (f"confidence {f.confidence:.3f} (champion {f.champion_confidence:.3f})"
                  if f.confidence is not None and f.champion_confidence is not None else "confidence unknown")
    measured = (f"{f.requests} requests: agreement {f.agreement:.3f}, errors {f.error_share:.3f}, "
                + (f"p99 {f.p99_s * 1000:.0f} ms vs the champion's {f.champion_p99_s * 1000:.0f} ms, "
                   if ratio is not None else "") + confidence)
    if failures:
        return False, f"shadow failed ({'; '.join(failures)}) on {measured}"
    return True, f"shadow passed on {measured}"
