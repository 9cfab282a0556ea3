"""A/B of server (a): alternate checkouts or settings on one machine, in one sitting.

The VM's speed drifts ~30% within an hour, so only interleaved runs compare. Each run serves
``service:CIFAR10Classifier`` from CHECKOUT with ``bench_serving``'s model (run it once with
``--widths 64,128,128 --tta`` first), warms it up for 4 s and measures 12 s with wrk (``--concurrency``, 32 by default). A spec's
``VAR=value`` settings go to its server's environment; ``TAG_FILE=...`` names another model.

    .venv/bin/python -m bench.ab_serving ROUNDS "CHECKOUT [VAR=value ...]" "CHECKOUT [VAR=value ...]" ...
    .venv/bin/python -m bench.ab_serving 3 /work/wt-base ". CIFAR10_TRACE_REQUESTS=1" ". CIFAR10_TRACE_REQUESTS=0"
    .venv/bin/python -m bench.ab_serving 3 ". TAG_FILE=/tmp/serving-bench/model_tag_other" .
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench.bench_serving import run_wrk, wrk_inputs
from training.packaging.server import bentoml_serve, free_port, start_server, stop_server


def measure(spec: str, state: Path, script: Path, image: Path, concurrency: int = 32) -> dict:
    """One run of ``spec`` ("CHECKOUT [VAR=value ...]"): wrk's row for its 12 measured seconds."""
    checkout, *pairs = spec.split()
    settings = dict(pair.split("=", 1) for pair in pairs)
    tag = Path(settings.pop("TAG_FILE", state / "model_tag_64_128_128_tta")).read_text().strip()
    env = {**os.environ, "BENTOML_HOME": str(state / "bentoml"), "BENTOML_DO_NOT_TRACK": "True", **settings}
    port = free_port()
    proc = start_server(bentoml_serve("service:CIFAR10Classifier", port, "--arg", f"model_tag={tag}"),
                        state / "ab-serve.log", port, 180, env=env, cwd=Path(checkout).resolve())
    try:
        run_wrk(f"http://127.0.0.1:{port}/predict", concurrency, 4, script, image, proc.pid)  # warm-up
        return run_wrk(f"http://127.0.0.1:{port}/predict", concurrency, 12, script, image, proc.pid)
    finally:
        stop_server(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rounds", type=int)
    parser.add_argument("specs", nargs="+", metavar="CHECKOUT [VAR=value ...]")
    parser.add_argument("--state", type=Path, default=Path(os.environ.get("BENCH_STATE", "/tmp/serving-bench")),
                        help="bench_serving's state folder (its model)")
    parser.add_argument("--concurrency", type=int, default=32, help="wrk's open connections")
    args = parser.parse_args()
    script, image = wrk_inputs(args.state)
    for _ in range(args.rounds):
        for spec in args.specs:
            row = measure(spec, args.state, script, image, args.concurrency)
            print(f"{spec} | {row['rps']:.1f} req/s, p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
                  f"non-2xx: {row['non_2xx']}, server CPU {row['server_cpu_share']:.0%}", flush=True)


if __name__ == "__main__":
    main()
