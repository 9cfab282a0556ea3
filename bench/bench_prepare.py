"""Benchmark: prepare an image-folder archive end to end (decode, validate, split, digest, write).

Usage: .venv/bin/python -m bench.bench_prepare [ARCHIVE] [--workers N]

Default archive: ../shared/data/cifar10-train-jpeg.zip (50,000 JPEGs). Prints one JSON
line: wall seconds of ``prepare`` (fresh state folder, so nothing is cached), peak RSS of
this process and of the largest worker, CPU seconds of both (``resource.getrusage``; the sum is an upper bound
on the peak of all together, since forked workers share pages with the parent), the
machine's load average at the start, and the prepared sizes. Targets: <= 15 s and <= 1 GB
on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path


DEFAULT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-train-jpeg.zip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", nargs="?", default=str(DEFAULT))
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: config default)")
    args = parser.parse_args()

    from training.config import load_config
    from training.data.decode_pool import default_workers
    from training.data.prepare import prepare

    archive = Path(args.archive).resolve()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as state:
        overrides = {"state_dir": state, "data_url": archive.as_uri()}
        if args.workers is not None:
            overrides["decode_workers"] = args.workers
        config = load_config(overrides)
        start = time.perf_counter()
        out = prepare(archive, config)
        wall = time.perf_counter() - start
        manifest = json.loads((out / "manifest.json").read_text())
        npz_bytes = (out / "data.npz").stat().st_size
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    self_kb, child_kb = me.ru_maxrss, kids.ru_maxrss
    print(json.dumps({
        "archive": archive.name,
        "workers": config.decode_workers or default_workers(),
        "wall_s": round(wall, 2),
        # CPU seconds of this process and its workers (whole run, including imports): a
        # figure that other load on the machine disturbs less than wall time.
        "cpu_s": round(me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, 2),
        "peak_rss_self_mb": round(self_kb / 1024, 1),
        "peak_rss_largest_child_mb": round(child_kb / 1024, 1),
        "peak_rss_sum_mb": round((self_kb + child_kb) / 1024, 1),
        "loadavg_at_start": [round(v, 2) for v in load],
        "sizes": manifest["sizes"],
        "unreadable": manifest["unreadable_images"],
        "npz_mb": round(npz_bytes / 2**20, 1),
        "digest": manifest["digest"][:16],
    }))


if __name__ == "__main__":
    main()
