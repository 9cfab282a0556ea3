"""Soak: the service under steady load for N minutes; errors and server memory growth.

``wrk`` (one thread, the multipart Lua body of ``bench_serving.py``) at concurrency 64
against ``bentoml serve service.py`` with an untrained ``build_model((32, 64, 128))``,
one 32x32 JPEG per request, in back-to-back one-minute runs. A sampler thread reads
the resident memory (RSS) of the server's whole process tree (BentoML runs its
workers as children) every 5 s. Growth is the mean RSS of the last minute over the
mean RSS of the first minute, minus one.

    apt-get install -y wrk
    .venv/bin/python -m bench.soak_serving [--minutes 10] [--concurrency 64] [--state /tmp/serving-soak]

Prints one JSON object (also written to ``soak.json`` in the state folder). Goal: 0 errors
(socket errors and non-2xx, 503s included) and RSS growth under 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from bench.bench_serving import WIDTHS, run_wrk, serving_model, tree_rss, wrk_inputs
from tests.helpers import ROOT
from training.packaging.server import bentoml_serve, free_port, start_server, stop_server


def sample_rss(pid: int, stop: threading.Event, samples: list[tuple[float, int]], every: float = 5.0) -> None:
    """Append (monotonic time, tree RSS) to ``samples`` every ``every`` seconds until ``stop`` is set."""
    while not stop.is_set():
        samples.append((time.monotonic(), tree_rss(pid)))
        stop.wait(every)


def soak(proc, url: str, args, script: Path, image: Path) -> list[dict]:
    """One wrk row per minute, with the server tree's mean RSS in that minute."""
    run_wrk(url, 8, 5, script, image, proc.pid)  # warm-up, not counted
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    threading.Thread(target=sample_rss, args=(proc.pid, stop, samples), daemon=True).start()
    minutes = []
    try:
        for minute in range(args.minutes):
            t0 = time.monotonic()
            row = run_wrk(url, args.concurrency, 60, script, image, proc.pid)
            rss = [r for t, r in samples if t >= t0]
            row.update(minute=minute + 1, rss_mib=round(sum(rss) / max(len(rss), 1) / 2**20, 1))
            minutes.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                  file=sys.stderr, flush=True)
    finally:
        stop.set()
    return minutes


def summary(minutes: list[dict], args, alive: bool, load_before, load_after) -> dict:
    first, last = minutes[0]["rss_mib"], minutes[-1]["rss_mib"]
    return {
        "minutes": args.minutes, "concurrency": args.concurrency, "requests": sum(m["requests"] for m in minutes),
        "errors": sum(m["errors"] + m["non_2xx"] for m in minutes),
        "socket_errors": sum(m["errors"] for m in minutes), "non_2xx": sum(m["non_2xx"] for m in minutes),
        "rps_mean": round(sum(m["rps"] for m in minutes) / len(minutes), 1),
        "p99_ms_worst_minute": round(max(m["p99_ms"] for m in minutes), 1),
        "rss_mib_first_minute": first, "rss_mib_last_minute": last,
        "rss_growth_pct": round(100 * (last / first - 1), 2), "server_alive_at_end": alive,
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(), "per_minute": minutes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--state", type=Path, default=Path("/tmp/serving-soak"))
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install -y wrk")
    if args.minutes < 2:
        sys.exit("--minutes must be at least 2 (first and last minute are compared)")
    script, image = wrk_inputs(args.state)
    tag, _ = serving_model(args.state, WIDTHS, tta=False)
    load_before, port = os.getloadavg(), free_port()
    env = {**os.environ, "BENTOML_HOME": str(args.state / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    proc = start_server(bentoml_serve("service:CIFAR10Classifier", port, "--arg", f"model_tag={tag}"),
                        args.state / "serve.log", port, 300, env=env, cwd=ROOT)
    try:
        minutes = soak(proc, f"http://127.0.0.1:{port}/predict", args, script, image)
        alive = proc.poll() is None
    finally:
        load_after = os.getloadavg()
        stop_server(proc)
    result = summary(minutes, args, alive, load_before, load_after)
    (args.state / "soak.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "per_minute"}))


if __name__ == "__main__":
    main()
