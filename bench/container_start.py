"""Time from `podman run` to the first /readyz 200 of the Bento image (target: at most 5 s).

Uses the pipeline's private container store (CIFAR10_STATE_DIR). Prints one line per
run, the median, the image size and the machine load (`uptime`): on a shared 2-core
machine, report the load next to the numbers.

    CIFAR10_STATE_DIR=.state .venv/bin/python -m bench.container_start [--image IMG] [--runs 3] [--cpu-shares 16384] \
        [-e CIFAR10_WORKERS=2] [--cpu]

``--cpu`` also prints the CPU seconds each process in the container had used when
/readyz first answered 200: unlike wall time, that hardly depends on the machine's load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from training.config import load_config
from training.packaging.container import container_env, image_size
from training.packaging.server import free_port, wait_ready


def cpu_seconds(name: str, env: dict[str, str]) -> list[tuple[float, str]]:
    """(CPU seconds, command line) of each live process in container ``name``."""
    script = ('for p in /proc/[0-9]*; do [ "${p#/proc/}" = "$$" ] && continue; '
              's=$(cat $p/stat 2>/dev/null) || continue; c=$(tr "\\0" " " < $p/cmdline); echo "$s|$c"; done')
    out = subprocess.run(["podman", "exec", name, "sh", "-c", script], env=env, capture_output=True, text=True).stdout
    tick = os.sysconf("SC_CLK_TCK")
    rows = []
    for line in out.splitlines():
        stat, _, cmd = line.partition("|")
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if "/proc/" in cmd:  # the probe itself
            continue
        rows.append(((int(fields[11]) + int(fields[12])) / tick, cmd.strip()[:90]))
    return rows


@contextmanager
def started(image: str, env: dict[str, str], cpu_shares: int, extra_env: list[str],
            timeout: float = 60) -> Iterator[tuple[float, str]]:
    """Run ``image``; yield (seconds from `podman run -d` to /readyz 200, the container's name); remove it after.

    ``extra_env`` are ``KEY=VALUE`` settings for the container (``podman run -e``). ``cpu_shares`` > 1024
    gives the container's cgroup more CPU weight than other jobs (niceness does not cross cgroups): on a
    shared machine that approximates an idle CPU; say so when reporting such a number.
    """
    port = free_port()
    name = f"cifar10-bench-{os.getpid()}-{port}"
    shares = ["--cpu-shares", str(cpu_shares)] if cpu_shares else []
    envs = sum((["-e", e] for e in extra_env), [])
    begin = time.monotonic()
    subprocess.run(["podman", "run", "-d", *shares, *envs, "--name", name, "-p", f"127.0.0.1:{port}:3000", image],
                   env=env, check=True, capture_output=True)
    try:
        # Polled often and without asking podman about the container, which would take CPU from its start.
        wait_ready(f"http://127.0.0.1:{port}", timeout, alive=lambda: True, log=str, every=0.05)
        yield time.monotonic() - begin, name
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], env=env, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="localhost/cifar10-classifier:latest")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cpu-shares", type=int, default=0, help="CPU weight of the container (default 1024)")
    parser.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment setting for the container, e.g. CIFAR10_WORKERS=2 (repeatable)")
    parser.add_argument("--cpu", action="store_true", help="print CPU seconds per container process at ready")
    args = parser.parse_args()
    env = container_env(load_config())
    print(f"image {args.image}; env {args.env or 'image defaults'}; load before: {os.getloadavg()}; "
          f"cpu shares {args.cpu_shares or 'default'}")
    times = []
    for i in range(args.runs):
        with started(args.image, env, args.cpu_shares, args.env) as (seconds, name):
            if args.cpu:
                rows = cpu_seconds(name, env)
                print(f"  CPU at ready: {sum(r[0] for r in rows):.2f} s in all; "
                      + "; ".join(f"{c:.2f} s {cmd}" for c, cmd in rows))
        times.append(seconds)
        print(f"run {i + 1}: podman run -> /readyz 200 in {seconds:.2f} s  (load {os.getloadavg()[0]:.2f})")
    size = image_size("podman", args.image, env)
    print(f"median {statistics.median(times):.2f} s, min {min(times):.2f} s over {args.runs} runs; "
          f"image {size / 1e6:.0f} MB; load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
