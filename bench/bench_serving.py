"""Serving benchmark, all in one run: (a) the Bento with batching, (b) without, (c) seed style, (d) ceiling.

(e) is BentoML's request path alone (``bench/http_floor.py``: same API shape, no decode,
no model), the floor under (a). The servers run with the product's settings; ``CIFAR10_*``
variables set in the environment reach every server and show in the reported settings.

One 32x32 JPEG per request, ``wrk`` (one thread, a Lua multipart body) at concurrency
1, 8, 32 and 64 against each server in turn on this machine; (d) is ONNX Runtime on
batches of 64 in this process, no HTTP. The model is an untrained ``build_model(widths)``
(the weights do not change the speed); ``--widths 64,128,128 --tta`` is what the default
recipe ships, the default ``32,64,128`` without TTA a lighter net.

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

from tests.helpers import ROOT, make_serving_model
from training.packaging.server import bentoml_serve, free_port, read_log, start_server, stop_server, wait_ready

WIDTHS = (32, 64, 128)
CONCURRENCY = (1, 8, 32, 64)
# Longest wait for a server's /readyz: the seed baseline loads Keras, a busy machine is slow.
START_TIMEOUT_S = 300

# wrk's summary as one JSON line, whatever the request: every script in bench/ ends with it.
WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %d, "duration_us": %d, "errors": %d, "status_errors": %d, '
    .. '"timeouts": %d, "p50_us": %d, "p99_us": %d}\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""

LUA = r"""
wrk.method = "POST"
local f = assert(io.open(os.getenv("BENCH_IMAGE"), "rb"))
local data = f:read("*a")
f:close()
local boundary = "----cifar10benchboundary"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
wrk.body = "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"img.jpg\"\r\n"
  .. "Content-Type: image/jpeg\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
""" + WRK_DONE


def wrk_inputs(state: Path) -> tuple[Path, Path]:
    """wrk's Lua script and the JPEG it sends, written into ``state``."""
    from PIL import Image

    state.mkdir(parents=True, exist_ok=True)
    script, image = state / "multipart.lua", state / "img.jpg"
    script.write_text(LUA)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image, quality=90)
    return script, image


def serving_model(state: Path, widths: tuple[int, ...], tta: bool, precision: str | None = None) -> tuple[str, Path]:
    """The bench model's tag in ``state``'s BentoML store, built on first use, and its Keras file. With
    ``precision`` the model also carries its int8 candidate, quantized from the same weights."""
    # One cached model per architecture, so runs with other widths never reuse it.
    name = f"model_tag_{'_'.join(map(str, widths))}{'_tta' if tta else ''}"
    tag_file = state / (f"{name}_{precision}" if precision else name)
    keras_path = state / f"{name}.keras"
    if not tag_file.exists():
        tag_file.write_text(make_serving_model(state / "bentoml", widths, str(keras_path), tta=tta,
                                               precision=precision))
    return tag_file.read_text().strip(), keras_path


def tree_total(pid: int, measure) -> float:
    """``measure(process)`` summed over ``pid`` and its children (BentoML runs workers as children)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += measure(p)
        except psutil.NoSuchProcess:
            pass
    return total


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its children."""
    return tree_total(pid, lambda p: sum(p.cpu_times()[:2]))


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its children."""
    return tree_total(pid, lambda p: p.memory_info().rss)


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


def load_levels(name: str, proc: subprocess.Popen, log: Path, url: str, duration: int, script: Path,
                image: Path, route: str = "/predict", ready: str = "/readyz",
                concurrency: tuple[int, ...] = CONCURRENCY) -> list[dict]:
    """wrk at every concurrency against ``route`` of the server at ``url`` (process ``proc``, log ``log``)."""
    run_wrk(f"{url}{route}", 8, 2, script, image, proc.pid)  # warm-up, not reported
    rows = []
    for c in concurrency:
        # A server still busy with the previous run's abandoned requests would be measured
        # unfairly: wait until it answers a probe again.
        wait_ready(url, START_TIMEOUT_S, lambda: proc.poll() is None, lambda: read_log(log), path=ready)
        rows.append(run_wrk(f"{url}{route}", c, duration, script, image, proc.pid))
        print(f"{name} c={c}: {rows[-1]}", flush=True)
    return rows


def batch_sizes(url: str) -> str:
    """The ``cifar10_batch_size`` histogram from the server's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        return "\n".join(line for line in resp.read().decode().splitlines()
                         if line.startswith("cifar10_batch_size_"))


def ceiling(onnx_path: Path, threads: int, calls: int = 1, seconds: float = 5.0) -> float:
    """(d): images/s of ONNX Runtime on batches of 64 in process, ``calls`` batches side by side."""
    from concurrent.futures import ThreadPoolExecutor

    from serving.model import onnx_session

    session = onnx_session(onnx_path, threads=threads)
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)).astype(np.float32)}
    for _ in range(3):
        session.run(None, feed)

    def loop(t0: float) -> int:
        n = 0
        while time.perf_counter() - t0 < seconds:
            session.run(None, feed)
            n += 64
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(calls) as pool:
        done = sum(pool.map(loop, [t0] * calls))
    return done / (time.perf_counter() - t0)


def servers(tag: str, keras_path: Path, args) -> dict:
    """Each server: (its command for a port, extra environment, seconds per wrk run)."""
    def bento(port: int) -> list[str]:
        return bentoml_serve("service:CIFAR10Classifier", port, "--arg", f"model_tag={tag}")

    def seed(port: int) -> list[str]:
        return [str(ROOT / ".venv/bin/uvicorn"), "--factory", "bench.seed_baseline:create_app", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning"]

    def floor(port: int) -> list[str]:
        return bentoml_serve("bench.http_floor:HTTPFloor", port)

    return {
        "a_batching": (bento, {}, args.duration),
        "b_no_batching": (bento, {"CIFAR10_MAX_BATCH_SIZE": "1"}, args.duration),
        "c_seed": (seed, {"SEED_KERAS_MODEL": str(keras_path)}, args.seed_duration),
        "e_http_floor": (floor, {}, args.duration),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--seed-duration", type=int, default=30,
                        help="seconds per wrk run against the slow seed baseline (it needs more for a p99)")
    parser.add_argument("--state", type=Path, default=Path("/tmp/serving-bench"))
    parser.add_argument("--only", default="abcde", help="subset of a, b, c, d, e to run")
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="conv widths of the model")
    parser.add_argument("--tta", action="store_true", help="flip TTA inside the model, as training exports it")
    parser.add_argument("--precision", choices=("auto", "float", "int8"),
                        help="the model also carries its int8 candidate, served as this setting chooses")
    args = parser.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install -y wrk")
    script, image = wrk_inputs(args.state)
    tag, keras_path = serving_model(args.state, widths, args.tta, args.precision)

    from serving.settings import ServingSettings

    settings = ServingSettings.from_env()
    results = {"load_before": os.getloadavg(), "model": f"build_model({widths}) untrained, tta={args.tta}", "tag": tag,
               "settings": vars(settings), "cpus": os.cpu_count(), "servers": {}}
    if "d" in args.only:
        # As served (CIFAR10_CPUS single-threaded calls side by side), and one call
        # with every core as intra-op threads; a/d uses the faster of the two.
        onnx_path = args.state / "bentoml" / "models" / tag.replace(":", "/") / "model.onnx"
        results["d_ceiling_img_s"] = {
            f"{settings.cpus} calls x 1 thread": ceiling(onnx_path, 1, settings.cpus),
            f"1 call x {os.cpu_count()} threads": ceiling(onnx_path, os.cpu_count())}
        print("d:", results["d_ceiling_img_s"], flush=True)
    env = {**os.environ, "BENTOML_HOME": str(args.state / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    for name, (command, extra, duration) in servers(tag, keras_path, args).items():
        if name[0] not in args.only:
            continue
        port, log = free_port(), args.state / f"{name}.log"
        proc = start_server(command(port), log, port, START_TIMEOUT_S, env={**env, **extra}, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        try:
            results["servers"][name] = {"rows": load_levels(name, proc, log, url, duration, script, image),
                                        "batch_size_metrics": batch_sizes(url) if name == "a_batching" else ""}
        finally:
            stop_server(proc)
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
