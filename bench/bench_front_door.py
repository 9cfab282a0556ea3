"""The front door's cost: the same Bento served directly and through nginx with the stacks' configuration.

One ``bentoml serve`` of the service (an untrained ``build_model(widths)``, as bench/bench_serving.py builds
it) and the stacks' two nginx rendered by training/deploy/proxy.py in front of it (the front, then the switch),
all on loopback; ``wrk`` (one
thread, bench_serving's Lua multipart body, one 32x32 JPEG per request) at concurrency 32, alternating
Bento alone and through nginx for ``--rounds`` rounds in one sitting, so machine noise falls on both.

    .venv/bin/python -m bench.bench_front_door [--duration 15] [--rounds 3] [--widths 64,128,128 --tta]

Prints one line per run and a Markdown table of medians, with the CPU model and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.bench_serving import WIDTHS, run_wrk, serving_model, tree_cpu, wrk_inputs
from training.deploy import proxy
from training.packaging.server import bentoml_serve, free_port, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=15, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--state", type=Path, default=Path("/tmp/front-door-bench"))
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    parser.add_argument("--tta", action="store_true")
    args = parser.parse_args()
    binary = proxy.nginx_binary()
    if not binary:
        raise SystemExit("no nginx: run .ci/setup-nginx.sh")
    state = args.state.resolve()
    tag, _ = serving_model(state, tuple(int(w) for w in args.widths.split(",")), args.tta)
    script, image = wrk_inputs(state)
    bento_port, proxy_port = free_port(), free_port()
    env = {**os.environ, "BENTOML_HOME": str(state / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    bento = start_server(bentoml_serve("service:CIFAR10Classifier", bento_port, "--arg", f"model_tag={tag}"),
                         state / "bento.log", bento_port, 300, env=env, cwd=ROOT)
    run = state / "stack"
    stack_env = {"STACK_RUN": str(run), "STACK_HOST": "127.0.0.1", "PROXY_PORT": str(proxy_port)}
    # The stacks' two nginx: the switch in front of the Bento, the front that clients reach in front of it.
    (run / "switch.sock").unlink(missing_ok=True)
    switch = subprocess.Popen([binary, "-c", str(proxy.write(stack_env, bento_port)), "-e", "stderr", "-p",
                               f"{run}/switch/"], stdout=subprocess.DEVNULL, stderr=(state / "switch.log").open("w"))
    deadline = time.monotonic() + 30
    while not (run / "switch.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    nginx = start_server([binary, "-c", str(proxy.write_front(stack_env)), "-e", "stderr", "-p", f"{run}/nginx/"],
                         state / "nginx.log", proxy_port, 30, ready="/readyz")
    rows = {"bento": [], "nginx": []}
    try:
        urls = {"bento": f"http://127.0.0.1:{bento_port}/predict", "nginx": f"http://127.0.0.1:{proxy_port}/predict"}
        for name, url in urls.items():  # warm-up, not reported
            run_wrk(url, 8, 3, script, image, bento.pid)
        for i in range(args.rounds):
            for name, url in urls.items():
                nginx_cpu0 = tree_cpu(nginx.pid) + tree_cpu(switch.pid)
                r = run_wrk(url, args.concurrency, args.duration, script, image, bento.pid)
                r["nginx_cpu_share"] = ((tree_cpu(nginx.pid) + tree_cpu(switch.pid) - nginx_cpu0) / args.duration
                                        / os.cpu_count())
                r["load"] = os.getloadavg()
                rows[name].append(r)
                print(name, i, json.dumps(r), flush=True)
    finally:
        stop_server(nginx)
        switch.terminate()
        switch.wait(30)
        stop_server(bento)
    print(f"\nCPU: {cpu_model()} ({os.cpu_count()} CPUs); load average at the end: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"| c={args.concurrency}, medians of {args.rounds} | req/s | p50 ms | p99 ms | errors+non-2xx | nginx CPU |")
    print("|---|---|---|---|---|---|")
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_ms", "p99_ms", "nginx_cpu_share")}
        bad = sum(r["errors"] + r["non_2xx"] for r in runs)
        print(f"| {'Bento alone' if name == 'bento' else 'through nginx'} | {med['rps']:.0f} | {med['p50_ms']:.1f} | "
              f"{med['p99_ms']:.1f} | {bad} | {med['nginx_cpu_share']:.1%} |")
    json.dump(rows, open(state / "front-door.json", "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
