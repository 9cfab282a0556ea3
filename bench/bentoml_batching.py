"""In-process batching (service.py) against BentoML's own batchable dispatcher, same model, same load.

Variants, each serving the same untrained 64/128/128 net with flip TTA (what the default
recipe ships; the weights do not change the speed), one 32x32 JPEG per ``POST /predict``:

- ``a``: the product, ``bentoml serve service:CIFAR10Classifier`` (``serving.batcher.MicroBatcher``).
- ``b``: BentoML's documented pattern (``bench/dispatcher_service.py:Front``): a front service
  decodes and validates, then calls a model service through ``bentoml.depends``; the model
  service's API is ``batchable=True``. ``runner_connection`` limits raised on the model service
  so the client's session recycling does not fail requests (bentoml/BentoML#5540, #5544, #4971).
- ``c``: one service whose ``/predict`` is ``batchable=True`` over decoded images
  (``bench/dispatcher_service.py:Batched``).
- ``r``: ``b`` with BentoML's default ``runner_connection`` (100 requests, 300 s): the
  session recycling, measured; in the first round only (``--once``).

All use the product's workers (the CPU count, at most 4; ``b``'s model service as many),
request guard, access log, tracing exclusions, one ONNX Runtime thread per call and the
model threads' niceness; ``max_batch_size`` 64 and a 1,000 ms latency budget for both
dispatchers. ``wrk`` (one thread, a Lua multipart body) loads each server at every
concurrency for the same duration; the order of the variants alternates from round to
round, and each round starts every server afresh. Only 127.0.0.1.

    apt-get install -y wrk
    .venv/bin/python -m bench.bentoml_batching [--duration 10] [--rounds 3] [--concurrency 32,8]

Prints Markdown tables (every run, then medians over the rounds) and writes
``results.json`` into the state folder (default ``/tmp/bentoml-batching``). Status codes
other than 200 are counted from the front's access log, and so are wrk's connections per
front worker: the workers share one listening socket, the one awake when wrk connects
takes most connections and keeps them, and a worker's Python request handling is bound to
about one core, so the split sets what a run can reach (report it with the figures). The
client's (wrk's) CPU share is reported because it runs on the same cores as the server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

from bench.bench_serving import LUA, run_wrk, wait_ready
from serving.settings import ServingSettings
from tests.helpers import free_port, make_serving_model, stop_server

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = (64, 128, 128)
BENTOML = str(ROOT / ".venv/bin/bentoml")
VARIANTS = {
    "a": ("a_in_process", "service:CIFAR10Classifier", {}),
    "b": ("b_depends_batchable", "bench.dispatcher_service:Front", {}),
    "c": ("c_batchable_api", "bench.dispatcher_service:Batched", {}),
    "r": ("r_depends_default_recycling", "bench.dispatcher_service:Front", {"BENCH_RUNNER_DEFAULTS": "1"}),
}
STATUS = re.compile(r"\(status=(\d{3}),")
# An access-log line: which worker of the front answered, on which client connection (port).
ACCESS = re.compile(r"\[entry_service:\w+:(\d+)\] 127\.0\.0\.1:(\d+) ")
BATCH_METRICS = ("cifar10_batch_size", "bentoml_service_adaptive_batch_size")


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def log_tail(path: Path, offset: int) -> tuple[str, int]:
    """What the server wrote to its log since ``offset``, and the new offset."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    return data.decode(errors="replace"), offset + len(data)


def connection_split(text: str, seen: set[str], workers: int) -> dict:
    """wrk's connections and requests per front worker in ``text``: ports not in ``seen`` are this run's.

    BentoML's workers share one listening socket and whichever is awake accepts most of wrk's
    connections, which it then keeps: the split decides how much of the machine a run can use.
    """
    conns, requests = Counter(), Counter()
    owner = {}
    for worker, port in ACCESS.findall(text):
        if port in seen:
            continue  # the previous run's last answers
        if port not in owner:
            owner[port] = worker
            conns[worker] += 1
        requests[worker] += 1
    seen.update(owner)
    ids = [str(i) for i in range(1, workers + 1)]
    return {"connections": [conns[i] for i in ids], "requests": [requests[i] for i in ids]}


def batch_sizes(port: int) -> dict:
    """Mean images per model call from the front's /metrics (both dispatchers export a histogram)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError as exc:
        return {"error": str(exc)}
    out = {}
    for name in BATCH_METRICS:
        total = sum(float(m) for m in re.findall(rf"^{name}_sum(?:{{[^}}]*}})? (\S+)$", text, re.M))
        count = sum(float(m) for m in re.findall(rf"^{name}_count(?:{{[^}}]*}})? (\S+)$", text, re.M))
        if count:
            out[name] = {"calls": int(count), "mean": round(total / count, 1)}
    return out


def bench_variant(key: str, tag: str, args, script: Path, image: Path, env: dict, round_no: int) -> dict:
    """Start one variant's server, warm it up, load it at each concurrency, stop it."""
    name, target, extra = VARIANTS[key]
    port = free_port()
    log_path = args.state / f"{name}-round{round_no}.log"
    cmd = [BENTOML, "serve", target, "--host", "127.0.0.1", "--port", str(port), "--arg", f"model_tag={tag}"]
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        ready_url = f"http://127.0.0.1:{port}/readyz"
        wait_ready(ready_url, proc, timeout=120)
        ready_s = time.monotonic() - started
        url = f"http://127.0.0.1:{port}/predict"
        # Warm-up, not reported: BentoML's dispatcher first runs single requests to fit its cost model.
        warm = run_wrk(url, 8, args.warmup, script, image, proc.pid)
        time.sleep(0.5)  # the warm-up's last access-log lines
        text, offset = log_tail(log_path, 0)
        seen = {port for _, port in ACCESS.findall(text)}
        workers = ServingSettings.from_env(env).workers
        rows = []
        for c in args.concurrency:
            wait_ready(ready_url, proc)  # abandoned requests of the previous run are done
            load_before = load()
            row = run_wrk(url, c, args.duration, script, image, proc.pid)
            time.sleep(0.5)  # the last access-log lines
            text, offset = log_tail(log_path, offset)
            statuses = Counter(STATUS.findall(text))
            row.update(variant=name, round=round_no, load_before=load_before, load_after=load(),
                       per_worker=connection_split(text, seen, workers),
                       statuses=dict(statuses), non_200=sum(n for s, n in statuses.items() if s != "200"),
                       disconnects=text.count("ServerDisconnectedError") + text.count("closing transport"))
            rows.append(row)
            print(f"round {round_no} {name} c={c}: {row['rps']:.1f} req/s, p50 {row['p50_ms']:.1f} ms, "
                  f"p99 {row['p99_ms']:.1f} ms, statuses {dict(statuses)}, socket errors {row['errors']}, "
                  f"per worker {row['per_worker']}, "
                  f"load {load_before[0]} -> {row['load_after'][0]}", flush=True)
        return {"variant": name, "round": round_no, "ready_s": round(ready_s, 1), "warmup_non_2xx": warm["non_2xx"],
                "batch_sizes": batch_sizes(port), "rows": rows}
    finally:
        stop_server(proc)


def serving_model(state: Path) -> str:
    """The BentoML tag of the untrained 64/128/128 TTA model in ``state/bentoml`` (built once)."""
    tag_file = state / "model_tag_64_128_128_tta"
    if not tag_file.exists():
        tag_file.write_text(make_serving_model(state / "bentoml", WIDTHS, tta=True))
    return tag_file.read_text().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up load per server start")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the variants' order alternates")
    parser.add_argument("--concurrency", default="32,8", help="wrk connections, comma-separated")
    parser.add_argument("--only", default="abcr", help="variants to run, of a, b, c, r")
    parser.add_argument("--once", default="r", help="variants run in the first round only")
    parser.add_argument("--state", type=Path, default=Path("/tmp/bentoml-batching"))
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install -y wrk")
    if unknown := set(args.only) - set(VARIANTS):
        sys.exit(f"unknown variants {sorted(unknown)}: choose from {sorted(VARIANTS)}")
    args.state.mkdir(parents=True, exist_ok=True)
    tag = serving_model(args.state)

    from PIL import Image

    image = args.state / "img.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image, quality=90)
    script = args.state / "multipart.lua"
    script.write_text(LUA)
    env = {**os.environ, "BENTOML_HOME": str(args.state / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "TF_CPP_MIN_LOG_LEVEL": "2"}

    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
               "model": f"build_model({WIDTHS}) untrained, tta=True", "tag": tag, "duration_s": args.duration,
               "settings": vars(ServingSettings.from_env()), "load_before": load(), "runs": []}
    started = time.monotonic()
    for round_no in range(1, args.rounds + 1):
        order = [k for k in args.only if round_no == 1 or k not in args.once]
        for key in order if round_no % 2 else order[::-1]:
            results["runs"].append(bench_variant(key, tag, args, script, image, env, round_no))
            (args.state / "results.json").write_text(json.dumps(results, indent=1))  # keep partial results
    results["load_after"] = load()
    results["wall_s"] = round(time.monotonic() - started, 1)
    results["summary"] = summary(results["runs"])
    (args.state / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(results)
    print(f"\nresults: {args.state / 'results.json'}")


def summary(runs: list[dict]) -> list[dict]:
    """Medians over the rounds per variant and concurrency; errors summed."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for run in runs:
        for row in run["rows"]:
            groups.setdefault((row["variant"], row["concurrency"]), []).append(row)
    out = []
    for (variant, conc), rows in groups.items():
        out.append({"variant": variant, "concurrency": conc, "runs": len(rows),
                    "rps": statistics.median(r["rps"] for r in rows),
                    "rps_range": [min(r["rps"] for r in rows), max(r["rps"] for r in rows)],
                    "p50_ms": statistics.median(r["p50_ms"] for r in rows),
                    "p99_ms": statistics.median(r["p99_ms"] for r in rows),
                    "p99_range": [min(r["p99_ms"] for r in rows), max(r["p99_ms"] for r in rows)],
                    "requests": sum(r["requests"] for r in rows), "non_200": sum(r["non_200"] for r in rows),
                    "socket_errors": sum(r["errors"] for r in rows),
                    "client_cpu_share": statistics.median(r["client_cpu_share"] for r in rows),
                    "server_cpu_share": statistics.median(r["server_cpu_share"] for r in rows),
                    "splits": ["/".join(map(str, r["per_worker"]["connections"])) for r in rows]})
    return sorted(out, key=lambda s: (-s["concurrency"], s["variant"]))


def print_tables(results: dict) -> None:
    print(f"\n{results['date']}, {results['cpus']} CPUs, {results['model']}, {results['duration_s']} s per run; "
          f"load before {results['load_before']}, after {results['load_after']}, {results['wall_s']} s in all")
    print("\n| round | variant | conc | req/s | p50 ms | p99 ms | non-200 (status: count) | socket errors | "
          "client CPU | server CPU | connections per worker | load 1-min before → after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in results["runs"]:
        for r in run["rows"]:
            codes = ", ".join(f"{s}: {n}" for s, n in sorted(r["statuses"].items()) if s != "200") or "0"
            print(f"| {r['round']} | {r['variant']} | {r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
                  f"{r['p99_ms']:.1f} | {codes} | {r['errors']} | {r['client_cpu_share']:.0%} | "
                  f"{r['server_cpu_share']:.0%} | {'/'.join(map(str, r['per_worker']['connections']))} | "
                  f"{r['load_before'][0]} → {r['load_after'][0]} |")
    print("\nMedians over the rounds (ranges in brackets); CPU shares of all cores:\n")
    print("| variant | conc | req/s | p50 ms | p99 ms | requests | non-200 | socket errors | client CPU | "
          "server CPU | connections per worker, by round |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in results["summary"]:
        print(f"| {s['variant']} | {s['concurrency']} | {s['rps']:.1f} ({s['rps_range'][0]:.0f}–"
              f"{s['rps_range'][1]:.0f}) | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} ({s['p99_range'][0]:.0f}–"
              f"{s['p99_range'][1]:.0f}) | {s['requests']} | {s['non_200']} | {s['socket_errors']} | "
              f"{s['client_cpu_share']:.0%} | {s['server_cpu_share']:.0%} | {', '.join(s['splits'])} |")
    print("\nServer start to /readyz, and mean images per model call (from /metrics where the front has it):")
    for run in results["runs"]:
        print(f"- round {run['round']} {run['variant']}: ready in {run['ready_s']} s, "
              f"warm-up non-2xx {run['warmup_non_2xx']}, batches {run['batch_sizes']}")


if __name__ == "__main__":
    main()
