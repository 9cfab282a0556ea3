"""Serving benchmark, all in one run: (a) the Bento with batching, (b) without, (c) seed style, (d) ceiling.

(e) is BentoML's request path alone (``bench/http_floor.py``: same API shape, no decode,
no model), the floor under (a). The servers run with the product's settings; ``CIFAR10_*``
variables set in the environment reach every server and show in the reported settings.

One 32x32 JPEG per request, ``wrk`` (one thread, a Lua multipart body) at concurrency
1, 8, 32 and 64 against each server in turn on this machine; (d) is ONNX Runtime on
batches of 64 in this process, no HTTP. The model is an untrained ``build_model(widths)``
(the weights do not change the speed); ``--widths 64,128,128 --tta`` is what the default
recipe ships, the default ``32,64,128`` without TTA the lighter net of the first
measurements.

    apt-get install -y wrk
    .venv/bin/python -m bench.bench_serving [--duration 10] [--widths 64,128,128 --tta] [--state DIR]

Prints a Markdown table and writes ``results.json`` into the state folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = (32, 64, 128)
CONCURRENCY = (1, 8, 32, 64)

from tests.helpers import free_port, make_serving_model, stop_server

LUA = r"""
wrk.method = "POST"
local f = assert(io.open(os.getenv("BENCH_IMAGE"), "rb"))
local data = f:read("*a")
f:close()
local boundary = "----cifar10benchboundary"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
wrk.body = "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"img.jpg\"\r\n"
  .. "Content-Type: image/jpeg\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %d, "duration_us": %d, "errors": %d, "status_errors": %d, '
    .. '"timeouts": %d, "p50_us": %d, "p99_us": %d}\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its children (BentoML runs workers as children)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_wrk(url: str, concurrency: int, duration: int, script: Path, image: Path, server_pid: int) -> dict:
    """One wrk run; returns throughput, latency percentiles, errors and CPU shares of client and server."""
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "--timeout", "30s", "-s", str(script), url]
    server_cpu0, t0 = tree_cpu(server_pid), time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "BENCH_IMAGE": str(image)})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall, server_cpu = time.monotonic() - t0, tree_cpu(server_pid) - server_cpu0
    match = re.search(r"^RESULT (.*)$", out, re.M)
    if status or not match:
        raise RuntimeError(f"wrk failed: {out}")
    r = json.loads(match.group(1))
    ncpu = os.cpu_count()
    return {"concurrency": concurrency, "rps": r["requests"] / (r["duration_us"] / 1e6),
            "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000, "requests": r["requests"],
            "errors": r["errors"], "non_2xx": r["status_errors"], "timeouts": r["timeouts"],
            "client_cpu_share": (usage.ru_utime + usage.ru_stime) / wall / ncpu,
            "server_cpu_share": server_cpu / wall / ncpu}


def bench_server(name: str, cmd: list[str], env: dict, port: int, path: str, args, script: Path,
                 image: Path) -> dict:
    """Start a server, load it at every concurrency, stop it."""
    log = open(args.state / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready = f"http://127.0.0.1:{port}/readyz" if name != "c_seed" else f"http://127.0.0.1:{port}/docs"
        wait_ready(ready, proc)
        url = f"http://127.0.0.1:{port}{path}"
        run_wrk(url, 8, 2, script, image, proc.pid)  # warm-up, not reported
        rows = []
        duration = args.seed_duration if name == "c_seed" else args.duration
        for c in CONCURRENCY:
            # A server still busy with the previous run's abandoned requests would be
            # measured unfairly: wait until it answers a probe again.
            wait_ready(ready, proc)
            rows.append(run_wrk(url, c, duration, script, image, proc.pid))
            print(f"{name} c={c}: {rows[-1]}", flush=True)
        metrics = ""
        if name.startswith("a_"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                metrics = "\n".join(line for line in resp.read().decode().splitlines()
                                    if line.startswith("cifar10_batch_size_") and not line.startswith("#"))
        return {"rows": rows, "batch_size_metrics": metrics}
    finally:
        stop_server(proc)
        log.close()


def ceiling(onnx_path: Path, threads: int, calls: int = 1, seconds: float = 5.0) -> float:
    """(d): images/s of ONNX Runtime on batches of 64 in process, ``calls`` batches side by side."""
    from serving.model import onnx_session

    session = onnx_session(onnx_path, threads=threads)
    batch = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)).astype(np.float32)
    for _ in range(3):
        session.run(None, {session.get_inputs()[0].name: batch})
    return images_per_second(session, batch, calls, seconds)


def images_per_second(session, batch: np.ndarray, calls: int, seconds: float) -> float:
    """Images/s of ``session`` on ``batch``, ``calls`` runs side by side for ``seconds``."""
    from concurrent.futures import ThreadPoolExecutor

    name = session.get_inputs()[0].name

    def loop(t0: float) -> int:
        n = 0
        while time.perf_counter() - t0 < seconds:
            session.run(None, {name: batch})
            n += len(batch)
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(calls) as pool:
        done = sum(pool.map(loop, [t0] * calls))
    return done / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--seed-duration", type=int, default=30,
                        help="seconds per wrk run against the slow seed baseline (it needs more for a p99)")
    parser.add_argument("--state", type=Path, default=Path("/tmp/serving-bench"))
    parser.add_argument("--only", default="abcde", help="subset of a, b, c, d, e to run")
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="conv widths of the model")
    parser.add_argument("--tta", action="store_true", help="flip TTA inside the model, as training exports it")
    args = parser.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install -y wrk")
    args.state.mkdir(parents=True, exist_ok=True)
    home = args.state / "bentoml"
    # One cached model per architecture, so runs with other widths never reuse it.
    tag_file = args.state / f"model_tag_{'_'.join(map(str, widths))}{'_tta' if args.tta else ''}"
    keras_path = args.state / f"{tag_file.name}.keras"
    if not tag_file.exists():
        tag_file.write_text(make_serving_model(home, widths, str(keras_path), tta=args.tta))
    tag = tag_file.read_text().strip()
    onnx_path = home / "models" / tag.replace(":", "/") / "model.onnx"

    from PIL import Image

    image = args.state / "img.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image, quality=90)
    script = args.state / "multipart.lua"
    script.write_text(LUA)

    from serving.settings import ServingSettings

    settings = ServingSettings.from_env()
    results = {"load_before": os.getloadavg(), "model": f"build_model({widths}) untrained, tta={args.tta}", "tag": tag,
               "settings": vars(settings), "cpus": os.cpu_count(), "servers": {}}
    if "d" in args.only:
        # As served (model_concurrency single-threaded calls side by side), and one call
        # with every core as intra-op threads; a/d uses the faster of the two.
        results["d_ceiling_img_s"] = {
            f"{settings.model_concurrency} calls x {settings.model_threads} thread":
                ceiling(onnx_path, settings.model_threads, settings.model_concurrency),
            f"1 call x {os.cpu_count()} threads": ceiling(onnx_path, os.cpu_count())}
        print("d:", results["d_ceiling_img_s"], flush=True)
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "TF_CPP_MIN_LOG_LEVEL": "2"}
    bento = [str(ROOT / ".venv/bin/bentoml"), "serve", "service:CIFAR10Classifier", "--host", "127.0.0.1",
             "--arg", f"model_tag={tag}"]
    servers = {
        "a_batching": (bento, {}, "/predict"),
        "b_no_batching": (bento, {"CIFAR10_MAX_BATCH_SIZE": "1"}, "/predict"),
        "c_seed": ([str(ROOT / ".venv/bin/uvicorn"), "bench.seed_baseline:app", "--host", "127.0.0.1",
                    "--log-level", "warning"], {"SEED_KERAS_MODEL": str(keras_path)}, "/predict"),
        "e_http_floor": ([str(ROOT / ".venv/bin/bentoml"), "serve", "bench.http_floor:HTTPFloor", "--host", "127.0.0.1"],
                         {}, "/predict"),
    }
    for name, (cmd, extra, path) in servers.items():
        if name[0] not in args.only:
            continue
        port = free_port()
        results["servers"][name] = bench_server(name, [*cmd, "--port", str(port)], {**env, **extra}, port, path,
                                                args, script, image)
        (args.state / "results.json").write_text(json.dumps(results, indent=1))  # keep partial results
    results["load_after"] = os.getloadavg()
    (args.state / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    """Markdown table of every server and concurrency, with a/c and a/d ratios."""
    servers = results["servers"]
    ceil = max(results.get("d_ceiling_img_s", {}).values(), default=None)
    print(f"\nsettings {results['settings']}")
    print(f"load before {results['load_before']}, after {results['load_after']}; model {results['model']}")
    print(f"(d) ceiling, ONNX Runtime batch 64 in process: {results.get('d_ceiling_img_s')}")
    print("| server | conc | req/s | p50 ms | p99 ms | non-2xx | errors | client CPU | server CPU | a/c | a/d |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, data in servers.items():
        for i, row in enumerate(data["rows"]):
            ac = ad = ""
            if name == "a_batching":
                if "c_seed" in servers:
                    seed = servers["c_seed"]["rows"][i]["rps"]
                    ac = f"{row['rps'] / seed:.1f}" if seed else "inf (seed: 0 done)"
                if ceil:
                    ad = f"{row['rps'] / ceil:.2f}"
            print(f"| {name} | {row['concurrency']} | {row['rps']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                  f"{row['non_2xx']} | {row['errors']} | {row['client_cpu_share']:.0%} | "
                  f"{row['server_cpu_share']:.0%} | {ac} | {ad} |")
    if servers.get("a_batching", {}).get("batch_size_metrics"):
        print("\n(a) batch sizes from /metrics:\n" + servers["a_batching"]["batch_size_metrics"])


if __name__ == "__main__":
    main()
