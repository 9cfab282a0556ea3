"""What hostile clients cost the served Bento, and what they leave the others.

Starts ``bentoml serve`` from a checkout (``--checkout``, default this one) with the model of
``bench/bench_serving.py``'s state, as the product serves it (2 workers on 2 cores), and measures:

1. ``batch``: ``/livez`` latency on 8 kept-alive connections (so both workers are probed) while
   ``--attackers`` clients send ``/predict_batch`` requests of 64 hostile PNGs back to back:
   40-megapixel all-black greyscale PNGs of 39 KB each, over the per-image pixel limit (``--batch old``), or
   64 images just under the service's per-request pixel budget, 8-bit grey (``budget``) or 16-bit
   RGBA (``budget16``).
2. ``deep``: a 16-bit 6000x6000 PNG (70 KB), and one of 2047x2047, just under the per-image pixel
   limit: seconds per answer and the server's extra memory.
3. ``eps``: an upload that starts ``%!PS-Adobe`` with a fake ``gs`` first on the server's PATH: the
   answer, and whether ``gs`` ran.
4. ``slow``: ``--slow`` connections that send their headers, then one body byte a second (reopened
   when the server closes them), and normal requests beside them (10 a second): the share
   answered 200.

    .venv/bin/python -m bench.bench_serving --only d --widths 64,128,128 --tta   # once: model, image
    .venv/bin/python -m bench.hostile_serving [--checkout DIR] [--only batch,deep,eps,slow]

Prints one JSON object per measurement and a summary line each.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from bench.bench_serving import tree_rss
from tests.helpers import ROOT, black_png
from training.packaging.server import bentoml_serve, free_port, start_server, stop_server

STATE = Path("/tmp/serving-bench")
PROBES = 8  # kept-alive /livez connections: with two workers, both are probed
PROBE_EVERY_S = 0.02


def multipart(files: list[bytes], field: str) -> tuple[bytes, str]:
    boundary = "hostilebenchboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{i}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(port: int, path: str, body: bytes, content_type: str, timeout: float = 120) -> tuple[int, bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", path, body, {"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, resp.read(), time.perf_counter() - t0
    finally:
        conn.close()


class Server:
    """``bentoml serve`` from ``checkout`` with the bench model, in its own session."""

    def __init__(self, checkout: Path, tag: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        full_env = {**os.environ, "BENTOML_HOME": str(STATE / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
                    **(env or {})}
        self.proc = start_server(bentoml_serve("service:CIFAR10Classifier", self.port, "--arg", f"model_tag={tag}"),
                                 STATE / "hostile-serve.log", self.port, 300, env=full_env, cwd=checkout)

    def stop(self) -> None:
        stop_server(self.proc)


def probe_livez(port: int, stop: threading.Event, latencies: list[float], failures: list[str]) -> None:
    """One kept-alive connection asking /livez every PROBE_EVERY_S until ``stop``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            conn.request("GET", "/livez")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                failures.append(str(resp.status))
        except (OSError, http.client.HTTPException) as exc:
            failures.append(type(exc).__name__)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            continue
        latencies.append(time.perf_counter() - t0)
        time.sleep(PROBE_EVERY_S)
    conn.close()


def budget_images(bits: int, colour: str) -> list[bytes]:
    """64 all-black PNGs of just under the service's per-request pixel budget together."""
    from serving.decoding import MAX_REQUEST_PIXELS

    side = int((MAX_REQUEST_PIXELS / 64) ** 0.5) - 1
    return [black_png(side, side, bits, colour)] * 64


BATCHES = {  # --batch: the 64 images of each hostile /predict_batch
    "old": lambda: [black_png(6324, 6324)] * 64,  # 40 megapixels each in 39 KB: refused from the header
    "budget": lambda: budget_images(8, "grey"),
    "budget16": lambda: budget_images(16, "rgba"),  # the most bytes per pixel a PNG decodes to
}


def measure_batch(server: Server, kind: str, attackers: int, seconds: float) -> dict:
    files = BATCHES[kind]()
    body, content_type = multipart(files, "files")
    stop, latencies, failures, answers = threading.Event(), [], [], []
    probes = [threading.Thread(target=probe_livez, args=(server.port, stop, latencies, failures)) for _ in range(PROBES)]
    for t in probes:
        t.start()
    time.sleep(1.0)
    quiet = len(latencies)

    def attack():
        while not stop.is_set():
            status, text, took = post(server.port, "/predict_batch", body, content_type)
            answers.append((status, round(took, 3), text[:120].decode(errors="replace")))

    attack_threads = [threading.Thread(target=attack) for _ in range(attackers)]
    t0 = time.perf_counter()
    for t in attack_threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in attack_threads + probes:
        t.join()
    under = np.array(latencies[quiet:]) * 1000
    return {"what": f"livez during /predict_batch of 64 {kind} PNGs", "body_bytes": len(body),
            "image_bytes": len(files[0]), "attackers": attackers, "seconds": round(time.perf_counter() - t0, 1),
            "batches": len(answers), "batch_answers": sorted({(s, t[:80]) for s, _, t in answers}),
            "batch_seconds": [a[1] for a in answers][:10],
            "probes": len(under), "probe_failures": failures[:10],
            "livez_ms": {"p50": round(float(np.percentile(under, 50)), 1),
                         "p99": round(float(np.percentile(under, 99)), 1), "max": round(float(under.max()), 1)}}


def measure_deep(server: Server, side: int, runs: int = 5) -> dict:
    png = black_png(side, side, bits=16)
    body, content_type = multipart([png], "file")
    base, peak, stop = tree_rss(server.proc.pid), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(server.proc.pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    answers = [post(server.port, "/predict", body, content_type) for _ in range(runs)]
    stop.set()
    sampler.join()
    times = sorted(a[2] for a in answers)
    return {"what": f"16-bit {side}x{side} PNG", "image_bytes": len(png), "answers": sorted({(a[0], a[1][:100].decode())
                                                                                           for a in answers}),
            "seconds": {"median": round(times[len(times) // 2], 3), "max": round(times[-1], 3)},
            "extra_rss_mb": round((peak[0] - base) / 2**20, 1)}


def measure_eps(checkout: Path, tag: str) -> dict:
    fake = STATE / "fake-gs"
    fake.mkdir(parents=True, exist_ok=True)
    marker = fake / "ran"
    marker.unlink(missing_ok=True)
    (fake / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (fake / "gs").chmod(0o755)
    server = Server(checkout, tag, {"PATH": f"{fake}:{os.environ['PATH']}"})
    try:
        eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n%%EOF\n"
        status, text, _ = post(server.port, "/predict", *multipart([eps], "file"))
    finally:
        server.stop()
    return {"what": "EPS upload with a fake gs first on PATH", "status": status, "answer": text[:200].decode(),
            "gs_ran": marker.exists()}


async def _slow_client(port: int, stop: asyncio.Event, closed: list[int]) -> None:
    """Headers, then one body byte a second; reopened whenever the server closes it."""
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: 100000\r\n\r\n").encode()
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            await writer.drain()
            while not stop.is_set():
                if reader.at_eof() or writer.is_closing():
                    break
                writer.write(b"-")
                await writer.drain()
                try:
                    await asyncio.wait_for(reader.read(1), 1.0)  # the server answered (408) or closed
                    break
                except asyncio.TimeoutError:
                    pass
            closed[0] += 1
            writer.close()
        except OSError:
            pass
        await asyncio.sleep(1.0)  # as a slow client would: reopen, but not in a tight loop


async def _normal(port: int, body: bytes, content_type: str, results: list[int]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                      f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 30)
        results.append(int(line.split()[1]) if line else 0)
        writer.close()
    except (OSError, asyncio.TimeoutError, IndexError, ValueError):
        results.append(0)


async def _slow_run(port: int, connections: int, seconds: float, image: bytes) -> dict:
    stop, closed, results = asyncio.Event(), [0], []
    slow = [asyncio.create_task(_slow_client(port, stop, closed)) for _ in range(connections)]
    await asyncio.sleep(3)  # every slow connection open and trickling
    body, content_type = multipart([image], "file")
    normal = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        normal.append(asyncio.create_task(_normal(port, body, content_type, results)))
        await asyncio.sleep(0.1)
    await asyncio.gather(*normal)
    stop.set()
    for task in slow:
        task.cancel()
    await asyncio.gather(*slow, return_exceptions=True)
    ok = sum(1 for s in results if s == 200)
    return {"what": f"{connections} slow-body connections beside normal requests", "normal": len(results),
            "ok_200": ok, "share_200": round(ok / max(1, len(results)), 4),
            "statuses": {str(s): results.count(s) for s in sorted(set(results))},
            "slow_connections_closed_by_server": closed[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=ROOT, help="serve this checkout's service.py")
    parser.add_argument("--only", default="batch,deep,eps,slow")
    parser.add_argument("--batch", default="budget", choices=sorted(BATCHES))
    parser.add_argument("--attackers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--slow", type=int, default=300)
    args = parser.parse_args()
    tag_file = STATE / "model_tag_64_128_128_tta"
    if not tag_file.exists():
        raise SystemExit(f"no {tag_file}: run .venv/bin/python -m bench.bench_serving --only d --widths 64,128,128 "
                         "--tta once")
    tag, only = tag_file.read_text().strip(), args.only.split(",")
    print(json.dumps({"cpu": _cpu_model(), "load": os.getloadavg(), "checkout": str(args.checkout)}), flush=True)
    if "eps" in only:
        print(json.dumps(measure_eps(args.checkout, tag)), flush=True)
    if not {"batch", "deep", "slow"} & set(only):
        return
    server = Server(args.checkout, tag)
    try:
        if "batch" in only:
            print(json.dumps(measure_batch(server, args.batch, args.attackers, args.seconds)), flush=True)
        if "deep" in only:
            for side in (6000, 2047):  # the finding's, and the largest under the per-image limit
                print(json.dumps(measure_deep(server, side)), flush=True)
        if "slow" in only:
            image = (STATE / "img.jpg").read_bytes()
            print(json.dumps(asyncio.run(_slow_run(server.port, args.slow, 30, image))), flush=True)
    finally:
        server.stop()
    print(json.dumps({"load_after": os.getloadavg()}))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
