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
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from bench.bench_serving import LUA, WIDTHS, run_wrk, wait_ready
from tests.helpers import free_port, make_serving_model, stop_server


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its children."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def sample_rss(pid: int, stop: threading.Event, samples: list[tuple[float, int]], every: float = 5.0) -> None:
    """Append (monotonic time, tree RSS) to ``samples`` every ``every`` seconds until ``stop`` is set."""
    while not stop.is_set():
        samples.append((time.monotonic(), tree_rss(pid)))
        stop.wait(every)


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
    args.state.mkdir(parents=True, exist_ok=True)
    home, tag_file = args.state / "bentoml", args.state / "model_tag"
    if not tag_file.exists():
        tag_file.write_text(make_serving_model(home, WIDTHS))
    tag = tag_file.read_text().strip()

    from PIL import Image

    image, script = args.state / "img.jpg", args.state / "multipart.lua"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image, quality=90)
    script.write_text(LUA)

    load_before, port = os.getloadavg(), free_port()
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    cmd = [str(ROOT / ".venv/bin/bentoml"), "serve", "service:CIFAR10Classifier", "--host", "127.0.0.1", "--port",
           str(port), "--arg", f"model_tag={tag}"]
    with open(args.state / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        url = f"http://127.0.0.1:{port}/predict"
        run_wrk(url, 8, 5, script, image, proc.pid)  # warm-up, not counted
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, stop, samples), daemon=True)
        sampler.start()
        minutes = []
        for minute in range(args.minutes):
            t0 = time.monotonic()
            row = run_wrk(url, args.concurrency, 60, script, image, proc.pid)
            rss = [r for t, r in samples if t >= t0]
            row.update(minute=minute + 1, rss_mib=round(sum(rss) / max(len(rss), 1) / 2**20, 1))
            minutes.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                  file=sys.stderr, flush=True)
        alive = proc.poll() is None
    finally:
        stop.set()
        load_after = os.getloadavg()
        stop_server(proc)
    first, last = minutes[0]["rss_mib"], minutes[-1]["rss_mib"]
    result = {
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
    (args.state / "soak.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "per_minute"}))


if __name__ == "__main__":
    main()
