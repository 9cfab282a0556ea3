"""Serving under hostile input and load: schemathesis fuzzing from the service's own OpenAPI
spec (every check: the spec says what the service takes and answers), a malformed-upload
corpus sent alongside valid traffic, and an overload burst.

All against a real ``bentoml serve`` on 127.0.0.1 (one server for the module). The
long soak is ``bench/soak_serving.py``, not a test.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from statistics import median

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import serve_service, stop_server
from tests.helpers import guarded_client, image_bytes

MAX_BODY = 300_000  # small body limit: the "huge body" cases stay cheap to send
MAX_FILES = 4
CORPUS_LIMIT_S = 1.0  # every malformed upload is refused within this
FUZZ_SEED = 20261126  # fixed: CI runs the same cases every time; change it to explore others


SERVER = {}  # the module server's log and the file a fake Ghostscript writes when it runs


@pytest.fixture(scope="module")
def server(serving_model, tmp_path_factory):
    """The service with default batching and overload settings, small body and file limits, and a fake
    Ghostscript first on its PATH that leaves a file behind if anything ever runs it."""
    folder = tmp_path_factory.mktemp("serve")
    (folder / "bin").mkdir()
    SERVER.update(log=folder / "serve.log", gs_ran=folder / "gs-ran")
    (folder / "bin" / "gs").write_text(f"#!/bin/sh\ntouch {SERVER['gs_ran']}\nexit 1\n")
    (folder / "bin" / "gs").chmod(0o755)
    proc, url = serve_service(serving_model, SERVER["log"],
                              {"CIFAR10_MAX_BODY_BYTES": str(MAX_BODY), "CIFAR10_MAX_FILES": str(MAX_FILES),
                               "PATH": f"{folder / 'bin'}:{os.environ['PATH']}"})
    try:
        yield url
    finally:
        stop_server(proc)


# ---------------------------------------------------------------- bugs the fuzzer found (fast, no server)

FORM_BODIES = {
    # BentoML 1.4.40 answered all of these 500; a text value in a file field was fetched as a URL.
    "text value in file field": ("multipart/form-data; boundary=b",
                                 b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\n{}\r\n--b--\r\n'),
    "URL in file field": ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; '
                          b'name="file"\r\n\r\nhttp://127.0.0.1:9/x\r\n--b--\r\n'),
    "no boundary": ("multipart/form-data", b"x"),
    "malformed part header": ("multipart/form-data; boundary=b",
                              b'--b\r\nContent\r-Disposition: form-data; name="file"\r\n\r\n{}\r\n--b--\r\n'),
    "url-encoded form": ("application/x-www-form-urlencoded", b"file=http%3A%2F%2F127.0.0.1%3A9%2Fx"),
}


@pytest.mark.parametrize("case", FORM_BODIES)
def test_guard_refuses_form_bodies_bentoml_answers_500(case):
    content_type, body = FORM_BODIES[case]
    resp = guarded_client(10_000).post("/form", content=body, headers={"Content-Type": content_type})
    assert resp.status_code == 400, resp.text
    assert "multipart file parts" in resp.json()["error"]


def test_guard_passes_a_file_part():
    resp = guarded_client(10_000).post("/form", files={"file": ("a.png", b"\x89PNG", "image/png")})
    assert resp.status_code == 200, resp.text


# ---------------------------------------------------------------- 1. schemathesis

# Schemathesis hooks (its documented extension points), for what a spec cannot say:
# - "a decodable image": to schemathesis any bytes (random ones, its sample PDF) are a valid file
#   part, and the service's 400 for them a failure. Its binary strings become real images, as a
#   client sends; malformed uploads are the corpus test's.
# - a form property holding [] is no part at all on the wire: a "negative" case whose only flaw is
#   such an extra property arrives as a valid request, and the service's 200 would count as a
#   failure. Those cases are dropped.
FUZZ_HOOKS = """
import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image

FORM_ROUTES = {"/predict": "file", "/predict_batch": "files"}


@st.composite
def images(draw):
    size = (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
    colour = tuple(draw(st.integers(0, 255)) for _ in range(3))
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=draw(st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "WEBP"])))
    return buf.getvalue()


schemathesis.openapi.format("binary", images())


@schemathesis.hook
def filter_body(context, body):
    field = FORM_ROUTES.get(context.operation.path) if context.operation else None
    form = getattr(body, "body", body)
    return not (field and isinstance(form, dict) and any(v == [] for k, v in form.items() if k != field))
"""
def test_schemathesis_every_check_finds_nothing(server, tmp_path):
    """Every operation in /docs.json with every check (status codes, response schemas, valid data
    accepted, invalid data refused, 405s, ...), bounded: at most 30 examples each and 60 s in all."""
    (tmp_path / "fuzz_hooks.py").write_text(FUZZ_HOOKS)
    cmd = [str(Path(sys.executable).parent / "st"), "run", f"{server}/docs.json",
           "--checks", "all", "--max-examples", "30", "--max-time", "60", "--seed", str(FUZZ_SEED),
           "--request-timeout", "20", "--generation-database", "none", "--workers", "1", "--no-color",
           "--report", "junit", "--report-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=tmp_path,
                         env={**os.environ, "SCHEMATHESIS_HOOKS": str(tmp_path / "fuzz_hooks.py")})
    ran = re.search(r"(\d+) generated", out.stdout)
    print(f"schemathesis: {ran.group(1) if ran else '?'} cases, seed {FUZZ_SEED}")
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
    assert ran and int(ran.group(1)) > 100, out.stdout[-3000:]


# ---------------------------------------------------------------- 2. malformed-upload corpus

def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (valid CRC), with no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def _bomb_png() -> bytes:
    """100 megapixels in ~12 kB."""
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    return buf.getvalue()


def _corpus() -> dict[str, dict]:
    """name -> httpx request arguments (route and body) of a malformed upload."""
    jpeg, png = image_bytes(5, size=(64, 64)), image_bytes(6, size=(64, 64), fmt="PNG")
    noise = np.random.default_rng(7).integers(0, 256, 4000, dtype=np.uint8).tobytes()

    def one(data: bytes, name="file") -> dict:
        return {"url": "/predict", "files": {name: ("x.jpg", data, "image/jpeg")}}

    return {
        "empty": one(b""),
        "truncated JPEG": one(jpeg[: len(jpeg) // 2]),
        "truncated PNG": one(png[: len(png) // 2]),
        "random bytes": one(noise),
        "text": one(b"this is not an image, it is text\n" * 10),
        "huge dimensions (PNG header 100000x100000)": one(_png_header(100_000, 100_000)),
        "decompression bomb": one(_bomb_png()),
        "arithmetic-coded JPEG": one(_arithmetic_jpeg()),
        "JPEGs over the pixel passes of a request": {"url": "/predict_batch", "files": [
            ("files", (f"{i}.jpg", _many_scan_jpeg(), "image/jpeg")) for i in range(2)]},
        "wrong field name": one(jpeg, name="image"),
        "too many files": {"url": "/predict_batch", "files": [("files", (f"{i}.jpg", jpeg, "image/jpeg"))
                                                              for i in range(MAX_FILES + 1)]},
        "huge body, Content-Length": {"url": "/predict", "huge_body": "content-length"},
        "huge body, chunked": {"url": "/predict", "huge_body": "chunked"},
        **{name: {"url": "/predict", "content": body, "headers": {"Content-Type": content_type}}
           for name, (content_type, body) in FORM_BODIES.items()},
    }


def _arithmetic_jpeg() -> bytes:
    """A progressive JPEG whose frame header says arithmetic coding: refused before its scans are read."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 120, 220)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    at = data.index(b"\xff\xc2")
    return data[:at] + b"\xff\xca" + data[at + 2:]


def _many_scan_jpeg() -> bytes:
    """4096x4096 progressive in 64 scans, ~100 KB: at the per-image limits, it alone fills a request's
    pixel passes (~0.5 s of decoding)."""
    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (90, 90, 90)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * (65 - data.count(b"\xff\xda")) + data[-2:]


async def _timed(client: httpx.AsyncClient, **request) -> tuple[int | str, float]:
    """(status or the transport error's name, seconds) of one POST."""
    t0 = time.perf_counter()
    try:
        if "huge_body" in request:
            status = await _post_huge_body(str(client.base_url), request["url"], request["huge_body"])
        else:
            status = (await client.post(request.pop("url"), **request)).status_code
    except (httpx.TransportError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
        status = type(exc).__name__
    return status, time.perf_counter() - t0


async def _post_huge_body(base_url: str, path: str, framing: str) -> int:
    """POST 4x the body limit the way curl sends a large body; return the final status.

    ``Expect: 100-continue``, body only after ``100 Continue``, and stop sending at the
    first final answer. The server answers early and then lingers, reading and dropping
    the rest before it closes (``_refuse_unread``); without that, a write racing the close
    got a reset here (``BrokenPipeError`` instead of 413, in one fresh-clone CI run).
    """
    url = httpx.URL(base_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    total, piece = 4 * MAX_BODY, b"\0" * 65536
    length = "Transfer-Encoding: chunked" if framing == "chunked" else f"Content-Length: {total}"
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nExpect: 100-continue\r\n"
                 f"Content-Type: multipart/form-data; boundary=b\r\n{length}\r\n\r\n".encode())
    try:
        head, sent, go = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n")), 0, False
        while True:
            if head.done():
                status = int(head.result().split()[1])
                if status != 100:
                    return status
                head, go = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n")), True
            if go and sent < total:
                try:
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece)
                    await writer.drain()
                    sent += len(piece)
                except ConnectionError:  # the server answered and closed: read its answer
                    go = False
            else:
                await asyncio.wait_for(asyncio.shield(head), 10)
    finally:
        head.cancel()
        writer.close()
def test_malformed_corpus_gets_fast_4xx_while_valid_requests_succeed(server):
    """Each malformed upload: a 4xx within 1 s, sent 4 at a time while 4 clients send valid images throughout."""
    corpus, valid = list(_corpus().items()), image_bytes(8)

    async def main():
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            ok = {"url": "/predict", "files": {"file": ("ok.jpg", valid, "image/jpeg")}}
            await _timed(client, **dict(ok))  # warm-up
            done, good, bad = asyncio.Event(), [], {}

            async def valid_traffic():
                while not done.is_set():
                    good.append(await _timed(client, **dict(ok)))

            async def malformed(worker: int):
                for name, request in corpus[worker::4]:
                    bad[name] = await _timed(client, **request)

            senders = [asyncio.create_task(valid_traffic()) for _ in range(4)]
            await asyncio.gather(*(malformed(w) for w in range(4)))
            done.set()
            await asyncio.gather(*senders)
            return good, bad

    good, bad = asyncio.run(main())
    print("corpus:", {name: f"{status} in {seconds * 1000:.0f} ms" for name, (status, seconds) in bad.items()},
          f"valid: {len(good)} sent, slowest {max(s for _, s in good) * 1000:.0f} ms")
    assert len(bad) == len(corpus) and good
    assert [status for status, _ in good] == [200] * len(good)
    wrong = {name: (status, round(seconds, 3)) for name, (status, seconds) in bad.items()
             if not (isinstance(status, int) and 400 <= status < 500 and seconds < CORPUS_LIMIT_S)}
    assert not wrong, f"not a 4xx within {CORPUS_LIMIT_S} s: {wrong}"


# ---------------------------------------------------------------- 3. overload burst
def test_burst_at_concurrency_256_sheds_load_and_recovers(server):
    """768 requests, 256 at a time: only 200/429/503, all answered, single-request latency back after."""
    valid = image_bytes(9)

    async def one(client: httpx.AsyncClient) -> tuple[int | str, float]:
        return await _timed(client, url="/predict", files={"file": ("ok.jpg", valid, "image/jpeg")})

    async def single_latency(client: httpx.AsyncClient) -> float:
        runs = [await one(client) for _ in range(10)]
        assert [status for status, _ in runs] == [200] * 10, runs
        return median(seconds for _, seconds in runs)

    async def main():
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(base_url=server, timeout=30, limits=limits) as client:
            await one(client)
            before = await single_latency(client)
            gate = asyncio.Semaphore(256)

            async def gated():
                async with gate:
                    return await one(client)

            t0 = time.perf_counter()
            burst = await asyncio.wait_for(asyncio.gather(*(gated() for _ in range(768))), timeout=120)
            burst_s = time.perf_counter() - t0
            return before, burst, burst_s, await single_latency(client)

    before, burst, burst_s, after = asyncio.run(main())
    codes = [status for status, _ in burst]
    counts = {code: codes.count(code) for code in set(codes)}
    print(f"burst: {counts} in {burst_s:.1f} s; single-request median {before * 1000:.0f} ms before, "
          f"{after * 1000:.0f} ms after")
    assert set(codes) <= {200, 429, 503}, counts
    assert 200 in counts, counts
    # The machine is shared: "back to normal" is a generous bound, not a benchmark.
    assert after < max(5 * before, before + 0.25), (before, after)


# ---------------------------------------------------------------- 4. what one client can take from the others

def test_postscript_upload_never_runs_ghostscript(server):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n%%EOF\n"
    resp = httpx.post(f"{server}/predict", files={"file": ("x.eps", eps, "application/postscript")}, timeout=30)
    assert resp.status_code == 400 and "not a PNG, JPEG, BMP, GIF or WebP image" in resp.json()["error"]
    assert not SERVER["gs_ran"].exists()


def test_health_answers_on_kept_alive_connections_while_hostile_batches_are_decoded(server):
    """Clients send /predict_batch of PNGs back to back: together just under the pixel budget per request
    (16-bit RGBA, the most bytes per pixel), or of 40 megapixels each (refused from their headers); /livez,
    asked on 8 kept-alive connections (both workers), keeps answering. A batch of 40-megapixel PNGs held a
    worker's event loop 10-16 s when every upload of at most 64 KiB was decoded on it."""
    from serving.decoding import MAX_REQUEST_PIXELS
    from tests.helpers import black_png

    side = int((MAX_REQUEST_PIXELS / MAX_FILES) ** 0.5) - 1
    batches = {"under the budget": [black_png(side, side, bits=16, colour="rgba")] * MAX_FILES,
               "40 megapixels each": [black_png(6324, 6324)] * MAX_FILES}

    async def main():
        stop, latencies, answers = asyncio.Event(), [], []
        async with httpx.AsyncClient(base_url=server, timeout=60,
                                     limits=httpx.Limits(max_keepalive_connections=8)) as probes:
            async def probe():
                while not stop.is_set():
                    t0 = time.perf_counter()
                    resp = await probes.get("/livez")
                    latencies.append((resp.status_code, time.perf_counter() - t0))
                    await asyncio.sleep(0.02)

            async def attack(files):
                async with httpx.AsyncClient(base_url=server, timeout=60) as client:
                    while not stop.is_set():
                        resp = await client.post("/predict_batch", files=[("files", (f"{i}.png", f, "image/png"))
                                                                          for i, f in enumerate(files)])
                        answers.append(resp.status_code)

            tasks = [asyncio.create_task(probe()) for _ in range(8)]
            await asyncio.sleep(0.5)
            attackers = [asyncio.create_task(attack(files)) for files in [*batches.values(), batches["under the budget"]]]
            await asyncio.sleep(6)
            stop.set()
            await asyncio.gather(*tasks, *attackers)
        return latencies, answers

    latencies, answers = asyncio.run(main())
    slowest = max(seconds for _, seconds in latencies)
    print(f"livez: {len(latencies)} probes, slowest {slowest * 1000:.0f} ms; batches: "
          f"{ {code: answers.count(code) for code in set(answers)} }")
    assert {code for code, _ in latencies} == {200}
    assert set(answers) == {200, 400} and answers.count(200) >= 2
    # A generous bound on a shared machine (bench/hostile_serving.py measures the p99): not seconds.
    assert slowest < 1.0, slowest


def test_clients_sending_slow_bodies_leave_the_others_their_slots(server):
    """300 connections send their headers, then a body byte a second; 100 normal requests beside them all get
    200, and a slow body is answered 408 (its connection then reopened, as a slow client would). With
    BentoML's own concurrency limit, which counts requests from their first byte, 3 in 30 got 200."""
    from serving.http import BODY_TIMEOUT_S

    url = httpx.URL(server)
    head = (f"POST /predict HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            "Content-Length: 100000\r\n\r\n").encode()

    async def slow_client(stop: asyncio.Event, answers: list[bytes]):
        while not stop.is_set():
            reader, writer = await asyncio.open_connection(url.host, url.port)
            writer.write(head)
            try:
                while not stop.is_set():
                    writer.write(b"-")
                    await writer.drain()
                    try:
                        answers.append(await asyncio.wait_for(reader.readline(), 1.0))
                        break
                    except asyncio.TimeoutError:
                        pass
            except ConnectionError:
                pass
            writer.close()

    async def main():
        stop, slow_answers, statuses = asyncio.Event(), [], []
        slow = [asyncio.create_task(slow_client(stop, slow_answers)) for _ in range(300)]
        await asyncio.sleep(2)
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            async def normal():
                resp = await client.post("/predict", files={"file": ("ok.jpg", image_bytes(3), "image/jpeg")})
                statuses.append(resp.status_code)

            normal_requests = []
            t0 = time.monotonic()
            while len(normal_requests) < 100:
                normal_requests.append(asyncio.create_task(normal()))
                await asyncio.sleep(0.15)
            await asyncio.gather(*normal_requests)
            while not slow_answers and time.monotonic() - t0 < BODY_TIMEOUT_S + 10:
                await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*slow, return_exceptions=True)
        return statuses, slow_answers

    statuses, slow_answers = asyncio.run(main())
    assert statuses.count(200) >= 99, {code: statuses.count(code) for code in set(statuses)}
    assert slow_answers and all(line.startswith(b"HTTP/1.1 408") for line in slow_answers), slow_answers[:3]


def test_a_burst_of_keep_alive_connections_is_spread_over_the_workers(server):
    """32 connections opened at once, each sending requests back to back for 3 s, reconnecting when an answer
    says ``Connection: close``. The workers share one listening socket, and the first awake used to accept all
    32 (half the server idle); the one over its share now closes connections until each holds about as many,
    give or take serving/balance.py's SLACK."""
    import psutil

    from serving.settings import ServingSettings

    workers, url = ServingSettings().workers, httpx.URL(server)
    if workers < 2:
        pytest.skip("one worker (one CPU): nothing to balance")
    body = (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"ok.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + image_bytes(3) + b"\r\n--x--\r\n")
    request = (f"POST /predict HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: multipart/form-data; boundary=x\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def client(deadline: float, statuses: list[int], closes: list[int], connected: asyncio.Barrier,
                     sampled: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection(url.host, url.port)
        while time.monotonic() < deadline:
            writer.write(request)
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            await reader.readexactly(int(re.search(rb"content-length: *(\d+)", head)[1]))
            statuses.append(int(head.split()[1]))
            if b"connection: close" in head:  # as any HTTP/1.1 client: this connection ends, open another
                closes.append(1)
                writer.close()
                reader, writer = await asyncio.open_connection(url.host, url.port)
        await connected.wait()  # all 32 hold an open connection now
        await sampled.wait()
        writer.close()

    def held_by_worker() -> dict[int, int]:
        held = {}  # worker PID -> the connections it holds
        for conn in psutil.net_connections("tcp"):
            if conn.laddr and conn.laddr.port == url.port and conn.status == psutil.CONN_ESTABLISHED and conn.pid:
                held[conn.pid] = held.get(conn.pid, 0) + 1
        return held

    async def main():
        statuses, closes, connected, sampled = [], [], asyncio.Barrier(33), asyncio.Event()
        deadline = time.monotonic() + 3
        clients = [asyncio.create_task(client(deadline, statuses, closes, connected, sampled)) for _ in range(32)]
        await asyncio.wait_for(connected.wait(), 30)
        held, waited = {}, time.monotonic()
        while sum(held.values()) < 32 and time.monotonic() - waited < 5:  # the last reconnections accepted
            await asyncio.sleep(0.1)
            held = await asyncio.to_thread(held_by_worker)
        sampled.set()
        await asyncio.gather(*clients)
        return statuses, len(closes), held

    statuses, closes, held = asyncio.run(main())
    assert set(statuses) == {200}, {code: statuses.count(code) for code in set(statuses)}
    assert sum(held.values()) == 32, held
    # Each worker holds at least half an even share (an even split, give or take SLACK, once it settles), and
    # the connections that moved are a few per client at most, not a close on every answer.
    assert len(held) == workers and min(held.values()) >= 32 // workers // 2, held
    assert closes <= 64, closes


def test_a_refused_request_is_one_log_line_without_a_traceback(server):
    resp = httpx.post(f"{server}/predict", files={"file": ("x.jpg", b"log me once", "image/jpeg")}, timeout=30)
    assert resp.status_code == 400
    time.sleep(0.5)  # the log is written by the worker
    log = SERVER["log"].read_text()
    lines = [line for line in log.splitlines() if "refused POST /predict from 127.0.0.1:" in line
             and "400 file: not a readable image" in line]
    assert lines and all("[INFO]" in line for line in lines), lines
    assert "Traceback" not in log and "Exception on /predict" not in log
    # And no access-log line for the thousands of answered requests before it: it is off by default.
    assert "path=/predict," not in log
