"""Resident memory an ONNX Runtime session adds while serving batches of mixed sizes.

A worker runs two single-threaded calls side by side on batches of 1-64 images.
ONNX Runtime's CPU memory arena grows to the largest scratch space these calls have
needed together and keeps it: a server's memory rises until every batch size has met
every other, then stays. This measures that growth, with the arena on (the default)
and off, each configuration in a fresh process (freed memory kept by one run would
hide the next one's growth).

    .venv/bin/python -m bench.ort_arena MODEL.onnx [--batches 300] [--warm] [--buckets] [--pad-step 8]
        [--shrink] [--session-per-call] [--same-as-requested] [--no-mem-pattern]

``--warm`` does what the service does at start-up (``serving.model.warm_up``: two
full batches side by side) before measuring. The other options are the alternatives
tried (README, Serving): batch sizes padded up to powers of two or to multiples of a
step, the arena handing its extensions back after every call, and one session (so one
arena) per concurrent call. glibc's allocator settings pass through the environment,
e.g. ``MALLOC_MMAP_THRESHOLD_=131072`` (a fixed threshold: large blocks go back to the
system when freed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, queue, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np, onnxruntime as ort, psutil
from serving.model import warm_up
cfg = json.loads(sys.argv[1])
rss = lambda: psutil.Process().memory_info().rss / 2**20
options = ort.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads, options.enable_cpu_mem_arena = 1, 1, cfg["arena"]
options.enable_mem_pattern = not cfg["no_mem_pattern"]
run_options = ort.RunOptions()
if cfg["shrink"] and cfg["arena"]:  # hand the arena's extensions back to the system after every call
    run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
if cfg["same_as_requested"] and cfg["arena"]:  # a process-wide arena that grows by what is asked, not doubling
    ort.create_and_register_allocator(
        ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT),
        ort.OrtArenaCfg(0, 1, -1, -1))
    options.add_session_config_entry("session.use_env_allocators", "1")
free = queue.Queue()  # sessions not running; one session shared by both threads unless --session-per-call
for _ in range(2 if cfg["session_per_call"] else 1):
    free.put(ort.InferenceSession(cfg["model"], options, providers=["CPUExecutionProvider"]))
def infer(pixels):
    session = free.get() if cfg["session_per_call"] else free.queue[0]
    try:
        return session.run(None, {session.get_inputs()[0].name: pixels.astype(np.float32)}, run_options)
    finally:
        if cfg["session_per_call"]:
            free.put(session)
inputs = {b: np.zeros((b, 32, 32, 3), np.uint8) for b in range(1, 65)}
infer(inputs[1])
if cfg["warm"]:
    warm_up(infer, 64, 2)
start, sizes, samples = rss(), np.random.default_rng(0).integers(1, 65, cfg["batches"]), []
if cfg["buckets"]:  # pad each batch up to a power of two: 7 shapes instead of 64
    sizes = 2 ** np.ceil(np.log2(sizes)).astype(int)
if cfg["pad_step"]:  # pad up to 1, 2, 4 or a multiple of the step
    sizes = np.array([n if n in (1, 2, 4) else -(-n // cfg["pad_step"]) * cfg["pad_step"] for n in sizes])
t0 = time.perf_counter()
with ThreadPoolExecutor(2) as pool:
    for i, _ in enumerate(pool.map(lambda b: infer(inputs[b]), sizes)):
        if (i + 1) % (len(sizes) // 5) == 0:
            samples.append(round(rss() - start, 1))
print(json.dumps({**{k: v for k, v in cfg.items() if k != "model"},
                  "img_per_s": round(int(sizes.sum()) / (time.perf_counter() - t0)),
                  "rss_after_one_image_mib": round(start, 1), "growth_mib_by_fifths": samples}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--warm", action="store_true", help="the service's warm-up (two full batches) first")
    parser.add_argument("--buckets", action="store_true", help="pad batch sizes up to powers of two")
    parser.add_argument("--pad-step", type=int, default=0, help="pad batch sizes up to multiples of this")
    parser.add_argument("--shrink", action="store_true",
                        help="run option memory.enable_memory_arena_shrinkage=cpu:0 (arena runs only)")
    parser.add_argument("--same-as-requested", action="store_true",
                        help="arena_extend_strategy kSameAsRequested (a shared env allocator; arena runs only)")
    parser.add_argument("--no-mem-pattern", action="store_true",
                        help="SessionOptions.enable_mem_pattern = False (no per-shape planned memory block)")
    parser.add_argument("--session-per-call", action="store_true", help="two sessions, one per running call")
    args = parser.parse_args()
    for arena in (True, False, True, False):
        cfg = {"model": str(Path(args.model).resolve()), "arena": arena, "batches": args.batches, "warm": args.warm,
               "buckets": args.buckets, "pad_step": args.pad_step, "shrink": args.shrink,
               "session_per_call": args.session_per_call, "same_as_requested": args.same_as_requested,
               "no_mem_pattern": args.no_mem_pattern}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True,
                             check=True, cwd=ROOT)  # cwd: training/ importable
        print(json.loads(out.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
