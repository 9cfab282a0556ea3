"""Resident memory an ONNX Runtime session adds while serving batches of mixed sizes.

A worker runs two single-threaded calls side by side on batches of 1-64 images.
ONNX Runtime's CPU memory arena grows to the largest scratch space these calls have
needed together and keeps it: a server's memory rises until every batch size has met
every other, then stays. This measures that growth, with the arena on (the default)
and off, each configuration in a fresh process (freed memory kept by one run would
hide the next one's growth).

    .venv/bin/python bench/ort_arena.py MODEL.onnx [--batches 300] [--warm] [--buckets]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np, onnxruntime as ort, psutil
path, arena, count, warm, buckets = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1"
rss = lambda: psutil.Process().memory_info().rss / 2**20
options = ort.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads, options.enable_cpu_mem_arena = 1, 1, arena
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
inputs = {b: np.zeros((b, 32, 32, 3), np.float32) for b in range(1, 65)}
session.run(None, {name: inputs[1]})
if warm:  # two largest batches side by side first: the footprint a worker reaches under load
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda b: session.run(None, {name: inputs[b]}), [64, 64]))
start, sizes, samples = rss(), np.random.default_rng(0).integers(1, 65, count), []
if buckets:  # pad each batch up to a power of two: 7 shapes instead of 64
    sizes = 2 ** np.ceil(np.log2(sizes)).astype(int)
t0 = time.perf_counter()
with ThreadPoolExecutor(2) as pool:
    for i, _ in enumerate(pool.map(lambda b: session.run(None, {name: inputs[b]}), sizes)):
        if (i + 1) % (count // 5) == 0:
            samples.append(round(rss() - start, 1))
print(json.dumps({"arena": arena, "warmed_with_2x64": warm, "power_of_two_batches": buckets, "img_per_s": round(int(sizes.sum()) / (time.perf_counter() - t0)),
                  "rss_after_one_image_mib": round(start, 1), "growth_mib_by_fifths": samples}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--warm", action="store_true", help="run two 64-image batches side by side before measuring")
    parser.add_argument("--buckets", action="store_true", help="pad batch sizes up to powers of two")
    args = parser.parse_args()
    for arena in ("1", "0", "1", "0"):
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, arena, str(args.batches), str(int(args.warm)),
                              str(int(args.buckets))],
                             capture_output=True, text=True, check=True)
        print(json.loads(out.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
