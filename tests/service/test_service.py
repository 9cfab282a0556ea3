"""The service: fast unit tests of its parts, and e2e tests against a real ``bentoml serve`` process."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serving import model as serving_model_module
from serving import lineage, openapi
from serving.cpu import cpu_share
from serving.batcher import MicroBatcher, Overloaded
from serving.http import RequestGuard, Upload
from serving.settings import ServingSettings
from tests.helpers import CLASSES, ROOT, OverlapModel, encode, guarded_client, image_bytes, natural_images, stop_server
from tests.helpers import documented, require
from tests.helpers import serve_service as _serve

MAX_BODY = 300_000  # small limit so the 413 tests send little
MAX_FILES = 4


# ---------------------------------------------------------------- unit tests (fast)

def test_model_calls_run_side_by_side_one_per_cpu_the_server_may_use():
    assert ServingSettings.from_env({}).cpus == cpu_share() >= 1
    assert ServingSettings.from_env({"CIFAR10_CPUS": "3"}).cpus == 3  # where the quota is not visible
    with pytest.raises(ValueError, match="CIFAR10_CPUS='0': must be a positive integer"):
        ServingSettings.from_env({"CIFAR10_CPUS": "0"})


# Each default of docs/serving.md's settings table, as the literal the table states.
DOCUMENTED_SETTINGS = {"max_batch_size": 64, "max_latency_ms": 1000, "max_files": 64, "max_body_bytes": 10485760,
                       "max_concurrency": 256, "access_log": 0, "trace_requests": 0, "drift_window": 256, "api_token": ""}


@pytest.mark.parametrize("name", DOCUMENTED_SETTINGS)
def test_each_documented_serving_default_is_the_literal_the_docs_state(name):
    literal = DOCUMENTED_SETTINGS[name]
    assert getattr(ServingSettings.from_env({}), name) == literal
    documented("docs/serving.md", f"| `CIFAR10_{name.upper()}` | {literal if literal != '' else 'empty'} |")


def test_workers_default_to_the_cpus_at_most_four_as_documented(monkeypatch):
    import serving.settings

    for cpus, workers in ((1, 1), (2, 2), (4, 4), (16, 4)):
        monkeypatch.setattr(serving.settings, "cpu_share", lambda: cpus)
        assert ServingSettings.from_env({}).workers == workers, cpus
    documented("docs/serving.md", "| `CIFAR10_WORKERS` | CPUs, at most 4 (**1 in the container image**) |")


def test_settings_from_env_overrides_and_rejects_nonpositive():
    s = ServingSettings.from_env({"CIFAR10_MAX_BATCH_SIZE": "8", "CIFAR10_MAX_BODY_BYTES": "1000"})
    assert (s.max_batch_size, s.max_body_bytes, s.max_files) == (8, 1000, ServingSettings().max_files)
    with pytest.raises(ValueError, match="CIFAR10_MAX_FILES='0': must be a positive integer"):
        ServingSettings.from_env({"CIFAR10_MAX_FILES": "0"})
    assert ServingSettings.from_env({"CIFAR10_ACCESS_LOG": "1"}).access_log == 1  # switches may be on
    with pytest.raises(ValueError, match=r"CIFAR10_ACCESS_LOG='2': must be 0 \(off\) or 1 \(on\)"):
        ServingSettings.from_env({"CIFAR10_ACCESS_LOG": "2"})


def test_model_threads_run_at_lower_priority():
    seen = []

    def infer(pixels):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return np.zeros((len(pixels), 10))

    async def go():
        for nice in (0, 3):
            await MicroBatcher(infer, 8, 10_000, nice=nice).submit(_pixels([1]))

    asyncio.run(go())
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert seen == [base, min(base + 3, 19)]


def _fake_model(calls: list[int], delay: float = 0.0):
    def infer(pixels: np.ndarray) -> np.ndarray:
        calls.append(len(pixels))
        time.sleep(delay)
        # "probabilities" that identify each input: its first pixel value, one-hot-ish
        return np.stack([np.full(10, float(p[0, 0, 0])) for p in pixels])
    return infer


def _pixels(values) -> np.ndarray:
    return np.stack([np.full((32, 32, 3), v, dtype=np.uint8) for v in values])


def test_batcher_groups_concurrent_requests_and_keeps_order():
    calls: list[int] = []

    async def main():
        batcher = MicroBatcher(_fake_model(calls, delay=0.05), max_batch_size=8, max_latency_ms=10_000)
        first = asyncio.create_task(batcher.submit(_pixels([0])))
        await asyncio.sleep(0.01)  # the first batch is running; the next ones queue behind it
        rest = [asyncio.create_task(batcher.submit(_pixels([v, v + 1]))) for v in (10, 20, 30)]
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert first[:, 0].tolist() == [0]
    assert [r[:, 0].tolist() for r in rest] == [[10, 11], [20, 21], [30, 31]]
    assert calls == [1, 6]  # the lone request went alone; the six queued images went together


def test_batcher_runs_up_to_concurrency_batches_side_by_side():
    async def main(batcher):
        return await asyncio.gather(*(batcher.submit(_pixels([v])) for v in range(6)))

    for concurrency in (1, 2):
        model = OverlapModel(delay=0.1)
        batcher = MicroBatcher(model, max_batch_size=1, max_latency_ms=10_000, concurrency=concurrency)
        results = asyncio.run(main(batcher))
        assert [r[:, 0].tolist() for r in results] == [[v] for v in range(6)]  # each got its own answer
        assert model.peak == concurrency


def test_batcher_caps_batch_size():
    calls: list[int] = []

    async def main():
        batcher = MicroBatcher(_fake_model(calls), max_batch_size=4, max_latency_ms=10_000)
        return await batcher.submit(_pixels(range(10)))

    assert asyncio.run(main())[:, 0].tolist() == list(range(10))
    assert calls == [4, 4, 2]


def test_warm_up_runs_full_batches_side_by_side():
    model = OverlapModel(delay=0.1)
    serving_model_module.warm_up(model, max_batch_size=16, concurrency=2)
    assert model.peak == 2 and model.sizes == [16, 16]


def test_batcher_sheds_requests_that_waited_past_the_budget():
    calls: list[int] = []

    async def main():
        batcher = MicroBatcher(_fake_model(calls, delay=0.2), max_batch_size=1, max_latency_ms=50)
        return await asyncio.gather(*(batcher.submit(_pixels([v])) for v in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert results[0][:, 0].tolist() == [0]
    assert all(isinstance(r, Overloaded) for r in results[1:]), results


def test_batcher_model_failure_fails_only_its_batch():
    def infer(pixels):
        if pixels[0, 0, 0, 0] == 66:
            raise RuntimeError("boom")
        return np.zeros((len(pixels), 10))

    async def main():
        batcher = MicroBatcher(infer, max_batch_size=1, max_latency_ms=10_000)
        return await asyncio.gather(batcher.submit(_pixels([66])), batcher.submit(_pixels([1])),
                                    return_exceptions=True)

    bad, good = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and good.shape == (1, 10)


def test_guard_refuses_large_declared_and_chunked_bodies():
    client = guarded_client(100)
    assert client.post("/", content=b"x" * 100).json() == {"received": 100}
    resp = client.post("/", content=b"x" * 101)
    assert resp.status_code == 413 and "100-byte limit" in resp.json()["error"]
    resp = client.post("/", content=iter([b"x" * 60, b"x" * 60]))  # no length: chunked
    assert resp.status_code == 413
    assert client.post("/", content=iter([b"x" * 30, b"x" * 30])).json() == {"received": 60}


def test_upload_keeps_the_form_part_in_memory():
    from starlette.datastructures import UploadFile

    upload = Upload.from_form(UploadFile(io.BytesIO(b"\x89PNG..."), filename="../../etc/car.png"))
    assert upload.data == b"\x89PNG..." and str(upload) == "car.png"  # the client's name, no directories
    assert Upload.from_form(b"raw").data == b"raw"
    with pytest.raises(ValueError, match=r"expected an uploaded file \(a multipart part with a filename\), not text"):
        Upload.from_form("http://example.com/car.png")  # text in a file field is never fetched


def test_guard_drops_the_rest_of_a_refused_body_for_at_most_linger_s():
    """After an early 413 the guard reads on (so the close sends no reset), but not forever."""
    sent, reads = [], 0

    async def endless_body():  # a client that never stops sending
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.001)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    async def send(message):
        sent.append(message)

    guard = RequestGuard(None, max_body_bytes=100, linger_s=0.2)
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"5000000")]}
    t0 = time.perf_counter()
    asyncio.run(guard(scope, endless_body, send))
    assert 0.2 <= time.perf_counter() - t0 < 2 and reads > 10
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert sent[1]["more_body"] and b"limit" in sent[1]["body"]  # the answer went out before the drain
    assert sent[-1] == {"type": "http.response.body", "body": b""}  # then the response ends: uvicorn closes


# ---------------------------------------------------------------- the guard: slow bodies, slots, token

FORM = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\nxx\r\n--b--\r\n'


def _form_scope(length: int = len(FORM), path: str = "/form", headers=()) -> dict:
    return {"type": "http", "method": "POST", "path": path, "client": ("10.0.0.7", 5555), "headers": [
        (b"content-type", b"multipart/form-data; boundary=b"), (b"content-length", str(length).encode()), *headers]}


def _whole_body(body: bytes = FORM):
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    return receive


def _trickle(first: bytes = FORM[:5], every: float = 0.05):
    """A client that sends ``first``, then one byte every ``every`` seconds, for ever."""
    sent = [False]

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": first, "more_body": True}
        await asyncio.sleep(every)
        return {"type": "http.request", "body": b"-", "more_body": True}
    return receive


class _Recorder:
    """An ASGI ``send`` that keeps what it is given; ``status`` is the answer's."""

    def __init__(self):
        self.messages = []

    async def __call__(self, message):
        self.messages.append(message)

    @property
    def status(self):
        return next((m["status"] for m in self.messages if m["type"] == "http.response.start"), None)

    @property
    def error(self):
        return json.loads(b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"))


async def _ok_app(scope, receive, send):
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _guard(**options) -> RequestGuard:
    return RequestGuard(_ok_app, **{"max_body_bytes": 10_000, "fields": {"/form": {"file": 1}}, "linger_s": 0.05,
                                    **options})


def test_guard_answers_408_to_a_body_that_does_not_arrive_in_time(caplog):
    send = _Recorder()
    t0 = time.perf_counter()
    with caplog.at_level("INFO", logger="serving.http"):
        asyncio.run(_guard(body_timeout_s=0.3)(_form_scope(5000), _trickle(), send))
    assert 0.3 <= time.perf_counter() - t0 < 1.5
    assert send.status == 408 and "did not arrive within 0.3 s" in send.error["error"]
    # One line for the refusal: route, client, status and reason; below ERROR, no traceback.
    [record] = [r for r in caplog.records if r.name == "serving.http"]
    assert record.levelname == "WARNING" and not record.exc_info
    assert record.getMessage().startswith("refused POST /form from 10.0.0.7:5555: 408 the request body did not")


def test_guard_leaves_a_client_that_went_away_before_its_body_arrived():
    """No answer and nothing for the app: a half body would reach BentoML's parser, which fails with a 500."""
    calls = []

    async def receive():
        if not calls:
            calls.append(1)
            return {"type": "http.request", "body": FORM[:10], "more_body": True}
        return {"type": "http.disconnect"}

    async def app(scope, receive, send):
        raise AssertionError("the app was called for a request whose client is gone")

    send = _Recorder()
    asyncio.run(RequestGuard(app, max_body_bytes=10_000, fields={"/form": {"file": 1}})(_form_scope(5000), receive, send))
    assert send.messages == []


def test_guard_counts_a_request_in_its_slots_only_once_its_body_arrived():
    """One slot: a client still sending its body does not take it from one whose body is in."""
    async def main():
        guard = _guard(max_concurrency=1, body_timeout_s=5)
        slow_send, fast_send = _Recorder(), _Recorder()
        slow = asyncio.create_task(guard(_form_scope(5000), _trickle(), slow_send))
        await asyncio.sleep(0.1)
        await guard(_form_scope(), _whole_body(), fast_send)
        slow.cancel()
        return fast_send.status

    assert asyncio.run(main()) == 200


def test_guard_answers_429_once_the_slots_are_taken_by_requests_being_answered():
    async def main():
        release = asyncio.Event()

        async def busy_app(scope, receive, send):
            await release.wait()
            await _ok_app(scope, receive, send)

        guard = RequestGuard(busy_app, max_body_bytes=10_000, fields={"/form": {"file": 1}}, max_concurrency=1)
        first, second = _Recorder(), _Recorder()
        running = asyncio.create_task(guard(_form_scope(), _whole_body(), first))
        await asyncio.sleep(0.05)
        await guard(_form_scope(), _whole_body(), second)
        release.set()
        await running
        return first.status, second.status, second.error["error"]

    first, second, error = asyncio.run(main())
    assert (first, second) == (200, 429) and "CIFAR10_MAX_CONCURRENCY" in error


def test_guard_caps_the_requests_still_sending_their_body():
    """Their own cap, larger than the slots (4x): past it, 503 at once."""
    from serving.http import RECEIVING_PER_SLOT

    async def main():
        guard = _guard(max_concurrency=1, body_timeout_s=5)
        slow = [asyncio.create_task(guard(_form_scope(5000), _trickle(), _Recorder()))
                for _ in range(RECEIVING_PER_SLOT)]
        await asyncio.sleep(0.1)
        over = _Recorder()
        await guard(_form_scope(5000), _trickle(), over)
        for task in slow:
            task.cancel()
        return over

    over = asyncio.run(main())
    assert over.status == 503 and "uploads are arriving" in over.error["error"]
    assert (b"retry-after", b"1") in over.messages[0]["headers"]


def test_guard_bounds_the_body_bytes_a_worker_holds():
    async def main():
        guard = _guard(body_timeout_s=5)
        guard.body_budget = 100
        holding = asyncio.create_task(guard(_form_scope(5000), _trickle(b"x" * 90), _Recorder()))
        await asyncio.sleep(0.05)
        over, fits = _Recorder(), _Recorder()
        await guard(_form_scope(50), _whole_body(b"y" * 50), over)
        holding.cancel()
        await asyncio.sleep(0)
        await guard(_form_scope(), _whole_body(), fits)  # freed once the other request ended
        return over, fits, guard._held

    over, fits, held = asyncio.run(main())
    assert over.status == 503 and "hold all the memory" in over.error["error"]
    assert fits.status == 200 and held == 0


@pytest.mark.parametrize("path, header, status", [
    ("/form", None, 401), ("/form", b"Bearer wrong", 401), ("/form", b"Basic s3cret", 401),
    ("/form", b"Bearer s3cret", 200), ("/metrics", None, 401), ("/metrics", b"Bearer s3cret", 200),
    ("/livez", None, 200), ("/readyz", None, 200)])
def test_guard_asks_for_the_token_on_api_and_metrics_routes_only(path, header, status):
    send = _Recorder()
    scope = _form_scope(path=path, headers=[(b"authorization", header)] if header else [])
    if path != "/form":
        scope["method"] = "GET"
    asyncio.run(_guard(token="s3cret")(scope, _whole_body(), send))
    assert send.status == status
    if status == 401:
        assert (b"www-authenticate", b"Bearer") in send.messages[0]["headers"]
        assert "Authorization: Bearer" in send.error["error"]


def test_guard_refuses_unknown_form_fields():
    client = guarded_client(1000)
    resp = client.post("/form", files={"other": ("a.bin", b"\xff\xd8", "image/jpeg")})
    assert resp.status_code == 400 and "['other']" in resp.json()["error"]
    assert client.post("/form", files={"file": ("a.bin", b"\xff\xd8", "image/jpeg")}).status_code == 200


def test_guard_reads_only_the_part_headers_and_leaves_the_one_parse_of_the_form_to_bentoml(monkeypatch):
    from starlette.formparsers import MultiPartParser

    def never(self):
        raise AssertionError("the guard built a form: BentoML parses it again")

    monkeypatch.setattr(MultiPartParser, "parse", never)
    client = guarded_client(1000)
    assert client.post("/form", files={"file": ("a.bin", b"\xff\xd8", "image/jpeg")}).status_code == 200
    resp = client.post("/form", files=[("file", ("a.jpg", b"\xff\xd8", "image/jpeg"))] * 2)
    assert resp.status_code == 400 and resp.json()["error"] == (
        "2 files in field 'file': at most 1 per request; split the request")


def test_guard_answers_errors_as_one_object():
    resp = guarded_client(100).post("/", content=b"bad")
    assert resp.status_code == 400 and resp.json() == {"error": "bad input"}
    assert int(resp.headers["content-length"]) == len(resp.content)


def test_guard_answers_validation_errors_in_the_same_shape():
    """BentoML's ``{"error": "1 validation error for Input", "detail": [...]}`` becomes one message."""
    resp = guarded_client(100).post("/form", content=b"invalid")
    assert resp.status_code == 400 and resp.json() == {
        "error": "invalid request to /form: file: Field required; "
                 "send images as multipart file parts (curl -F file=@image.png)"}
    assert int(resp.headers["content-length"]) == len(resp.content)


def test_guard_takes_an_api_route_with_a_trailing_slash_as_the_route():
    """Starlette answers ``/form/`` with a bodyless 307; the guard makes it ``/form``, its checks included."""
    client = guarded_client(1000)
    part = {"file": ("a.png", b"\x89PNG", "image/png")}
    resp = client.post("/form/", files=part, follow_redirects=False)
    assert resp.status_code == 200 and resp.json()["received"] > 0
    resp = client.post("/form/", files={"other": ("a.png", b"\x89PNG", "image/png")}, follow_redirects=False)
    assert resp.status_code == 400 and "['other']; /form takes file" in resp.json()["error"]
    resp = client.post("/form/", content=b"x" * 1001, follow_redirects=False)
    assert resp.status_code == 413
    # Other routes are left to Starlette.
    assert client.post("/other/", content=b"x", follow_redirects=False).status_code == 404


def test_guard_leaves_other_methods_on_an_api_route_to_the_router():
    """A PUT with a text field is answered 405 by the router, not 400 by the form check."""
    resp = guarded_client(1000).put("/form", files={"file": (None, "text")})
    assert resp.status_code == 405, resp.text


# ---------------------------------------------------------------- e2e: a real `bentoml serve`

SERVER_LOG: list[Path] = []  # the module server's log file


@pytest.fixture(scope="module")
def server(serving_model, tmp_path_factory):
    """The service as shipped (default workers), small body and file limits, and BentoML's access log (the
    tracing test reads it); yields its base URL."""
    SERVER_LOG[:] = [tmp_path_factory.mktemp("serve") / "serve.log"]
    proc, url = _serve(serving_model, SERVER_LOG[0],
                       {"CIFAR10_MAX_BODY_BYTES": str(MAX_BODY), "CIFAR10_MAX_FILES": str(MAX_FILES),
                        "CIFAR10_MAX_LATENCY_MS": "20000", "CIFAR10_ACCESS_LOG": "1"})
    try:
        yield url
    finally:
        stop_server(proc)


def _check_prediction(body: dict, class_names: list[str]) -> None:
    assert isinstance(body, dict), body
    assert set(body) == {"label", "class_id", "confidence", "probabilities"}
    assert list(body["probabilities"]) == class_names
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
    assert body["label"] == class_names[body["class_id"]]
    assert body["confidence"] == max(body["probabilities"].values())


def _predict(url: str, data: bytes, content_type="image/jpeg", name="img.jpg") -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"file": (name, data, content_type)}, timeout=60)
def test_seed_curl_form(server, serving_model, tmp_path):
    require("curl", "curl is not installed: apt-get install curl")
    (tmp_path / "car.png").write_bytes(image_bytes(0, size=(64, 48), fmt="PNG"))
    out = subprocess.run(["curl", "-s", "-X", "POST", f"{server}/predict", "-F", "file=@car.png"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    _check_prediction(json.loads(out.stdout), serving_model.metadata["class_names"])


# The seed's client call, character for character but the port: a trailing slash, and no -L,
# so a redirect would print nothing.
SEED_CURL = ("curl -X 'POST' 'http://localhost:{port}/predict/' -H 'accept: application/json' "
             "-H 'Content-Type: multipart/form-data' -F 'file=@car2.png;type=image/png'")
def test_seed_curl_command_verbatim_prints_the_prediction(server, serving_model, tmp_path):
    require(Path("/usr/bin/curl").exists(), "no /usr/bin/curl, which the seed's command runs: apt-get install curl")
    (tmp_path / "car2.png").write_bytes(image_bytes(4, size=(120, 80), fmt="PNG"))
    out = subprocess.run(SEED_CURL.format(port=httpx.URL(server).port), shell=True, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    _check_prediction(json.loads(out.stdout), serving_model.metadata["class_names"])
@pytest.mark.parametrize("route", ["/predict", "/predict/", "/predict_batch", "/predict_batch/", "/metadata",
                                   "/metadata/"])
def test_api_routes_answer_with_or_without_a_trailing_slash(server, serving_model, route):
    field = {"/predict": "file", "/predict_batch": "files"}.get(route.rstrip("/"))
    files = [(field, ("car.png", image_bytes(5, fmt="PNG"), "image/png"))] if field else None
    resp = httpx.post(f"{server}{route}", files=files, timeout=60, follow_redirects=False)
    assert resp.status_code == 200, (resp.status_code, resp.headers, resp.text)
    body = resp.json()
    if field is None:
        assert body["bentoml_model_tag"] == serving_model.tag
    else:
        _check_prediction(body[0] if field == "files" else body, serving_model.metadata["class_names"])
@pytest.mark.parametrize("request_args,status", [
    ({"files": {"other": ("a.jpg", image_bytes(0), "image/jpeg")}}, 400),  # unknown field
    ({"files": {"file": (None, "http://127.0.0.1:9/x")}}, 400),  # text in a file field
    ({"files": {"file": ("big.jpg", b"\0" * (MAX_BODY + 1), "image/jpeg")}}, 413),  # over the body limit
    ({"files": {"file": ("bad.jpg", b"not an image", "image/jpeg")}}, 400),  # not an image
    ({"content": b"--x--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400),  # no file
], ids=["unknown field", "text field", "over limit", "not an image", "no file"])
def test_the_guard_applies_to_the_trailing_slash_form_as_to_the_route(server, request_args, status):
    plain = httpx.post(f"{server}/predict", timeout=30, **request_args)
    slash = httpx.post(f"{server}/predict/", timeout=30, follow_redirects=False, **request_args)
    assert plain.status_code == status, plain.text
    assert (slash.status_code, slash.json()) == (plain.status_code, plain.json())
@pytest.mark.parametrize("fmt,mode,size", [("JPEG", "RGB", (32, 32)), ("PNG", "RGBA", (100, 60)),
                                           ("BMP", "L", (40, 40)), ("GIF", "P", (33, 31)), ("WEBP", "RGB", (50, 50))])
def test_predict_formats_give_one_object(server, serving_model, fmt, mode, size):
    resp = _predict(server, image_bytes(1, size, fmt, mode), content_type="application/octet-stream")
    assert resp.status_code == 200, resp.text
    _check_prediction(resp.json(), serving_model.metadata["class_names"])
def test_predict_batch_keeps_input_order(server, serving_model):
    images = [image_bytes(seed) for seed in range(MAX_FILES)]
    single = [_predict(server, img).json()["probabilities"] for img in images]
    assert len({json.dumps(p) for p in single}) == len(images), "test images should give distinct outputs"
    resp = httpx.post(f"{server}/predict_batch", files=[("files", (f"{i}.jpg", img, "image/jpeg"))
                                                       for i, img in enumerate(images)], timeout=60)
    assert resp.status_code == 200, resp.text
    batch = resp.json()
    assert isinstance(batch, list) and len(batch) == len(images)
    for got, want in zip(batch, single):
        _check_prediction(got, serving_model.metadata["class_names"])
        assert got["probabilities"] == pytest.approx(want, abs=1e-5)


def _truncated_jpeg() -> bytes:
    data = image_bytes(2, size=(64, 64))
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buf, format="PNG")  # 48 megapixels in a few kB
    return buf.getvalue()
@pytest.mark.parametrize("data,message", [(b"just some text", "not a readable image"),
                                          (b"", "empty file"),
                                          (_truncated_jpeg(), "corrupt or truncated"),
                                          (_bomb_png(), "decompression bomb")])
def test_bad_uploads_get_400_json(server, data, message):
    resp = _predict(server, data)
    assert resp.status_code == 400
    assert isinstance(resp.json(), dict) and message in resp.json()["error"]
def test_missing_field_gets_400(server):
    resp = httpx.post(f"{server}/predict", files={"other": ("a.jpg", image_bytes(0), "image/jpeg")}, timeout=30)
    assert resp.status_code == 400 and "error" in resp.json()
def test_too_many_files_gets_400(server):
    files = [("files", (f"{i}.jpg", image_bytes(i), "image/jpeg")) for i in range(MAX_FILES + 1)]
    resp = httpx.post(f"{server}/predict_batch", files=files, timeout=30)
    assert resp.status_code == 400 and f"at most {MAX_FILES}" in resp.json()["error"]
def test_bad_file_in_batch_names_it(server):
    files = [("files", ("ok.jpg", image_bytes(0), "image/jpeg")), ("files", ("bad.jpg", b"nope", "image/jpeg"))]
    resp = httpx.post(f"{server}/predict_batch", files=files, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"].startswith("file 1 (0-based): ")
def test_body_over_limit_gets_413(server):
    big = os.urandom(MAX_BODY + 1)
    resp = httpx.post(f"{server}/predict", content=big, timeout=30,
                      headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert resp.status_code == 413 and "limit" in resp.json()["error"]
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_client_that_writes_the_whole_body_first_still_reads_its_413(server, framing):
    """An asyncio client writes the whole body, then reads: a 413 reaches it only if the server lingers.

    Closing with unread bytes makes the kernel reset the connection; asyncio drops the
    connection at the first failed write, with the answer unread (``ConnectionResetError``).
    """
    url = httpx.URL(server)

    async def post() -> int | str:
        reader, writer = await asyncio.open_connection(url.host, url.port)
        total, piece = 10 * MAX_BODY, b"\0" * 65536
        length = "Transfer-Encoding: chunked" if framing == "chunked" else f"Content-Length: {total}"
        try:
            writer.write(f"POST /predict HTTP/1.1\r\nHost: {url.host}\r\n{length}\r\n"
                         "Content-Type: multipart/form-data; boundary=x\r\n\r\n".encode())
            for _ in range(0, total, len(piece)):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece)
                await writer.drain()
            writer.write(b"0\r\n\r\n" if framing == "chunked" else b"")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            return int(head.split()[1])
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            return type(exc).__name__
        finally:
            writer.close()

    async def main():
        return [await post() for _ in range(10)]

    assert asyncio.run(main()) == [413] * 10
def test_concurrent_good_and_bad_requests_fail_alone(server, serving_model):
    good, bad = image_bytes(3), b"GIF89a-but-not-really"
    jobs = [good if i % 3 else bad for i in range(30)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda data: _predict(server, data), jobs))
    for data, resp in zip(jobs, responses):
        if data is good:
            assert resp.status_code == 200, resp.text
            _check_prediction(resp.json(), serving_model.metadata["class_names"])
        else:
            assert resp.status_code == 400, resp.text
def test_metrics_show_batches_larger_than_one(server):
    files = [("files", (f"{i}.jpg", image_bytes(i), "image/jpeg")) for i in range(MAX_FILES)]
    assert httpx.post(f"{server}/predict_batch", files=files, timeout=60).status_code == 200
    metrics = httpx.get(f"{server}/metrics", timeout=30).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line.startswith("cifar10_batch_size_")}
    le2 = next(v for k, v in values.items() if k.startswith("cifar10_batch_size_bucket") and 'le="2.0"' in k)
    count = next(v for k, v in values.items() if k.startswith("cifar10_batch_size_count"))
    assert count > le2, "one four-image request must have made a batch of more than 2"
def _window_images(observation) -> int:
    return sum(w.images for w in observation.workers)


def test_metrics_report_classes_confidence_and_drift_per_worker(server):
    from training.monitor.metrics import parse

    before = parse(httpx.get(f"{server}/metrics", timeout=30).text)
    images = natural_images(4 * 8, seed=3)
    for i in range(0, len(images), 4):
        files = [("files", (f"{j}.png", encode(img), "image/png")) for j, img in enumerate(images[i:i + 4])]
        assert httpx.post(f"{server}/predict_batch", files=files, timeout=60).status_code == 200
    deadline = time.monotonic() + 10  # the drift gauges are updated once a second, off the request path
    while _window_images(after := parse(httpx.get(f"{server}/metrics", timeout=30).text)) < len(images):
        assert time.monotonic() < deadline, f"the drift window never held the {len(images)} images: {after}"
        time.sleep(0.5)
    assert set(after.predictions) == set(CLASSES)  # every class has a series, answered or not
    assert sum(after.predictions.values()) - sum(before.predictions.values()) == len(images)
    assert after.confidence_count - before.confidence_count == len(images)
    # One drift series per worker that has served (a pid label each). What the score says of served images
    # (low for training-like ones, over drift_threshold for inverted ones): tests/e2e/test_drift_retraining.py.
    assert after.workers and all(dict(w.labels).get("pid") for w in after.workers), after.workers
    assert sum(w.images for w in after.workers) >= len(images)


def test_metadata_matches_the_model(server, serving_model):
    resp = httpx.post(f"{server}/metadata", timeout=30)
    assert resp.status_code == 200, resp.text
    meta = resp.json()
    assert meta["bentoml_model_tag"] == serving_model.tag
    assert {k: meta[k] for k in serving_model.labels} == serving_model.labels
    for key in ("test_accuracy", "dataset_digest", "git_commit", "class_names"):
        assert meta[key] == serving_model.metadata[key]
    assert meta["bento_tag"] == "not a bento"
    assert meta["batching"]["max_files"] == MAX_FILES and meta["batching"]["max_body_bytes"] == MAX_BODY
    assert meta["precision"] == {"served": "float", "why": "the model has no int8 candidate", "float_img_s": None,
                                 "int8_img_s": None}


def test_an_int8_model_is_served_when_its_setting_says_so_and_answers_as_that_file(int8_serving_model, tmp_path):
    """Every worker runs the int8 file, says so in /metadata and the answers' headers, and answers as it does."""
    from serving.images import decode_image
    from training.model.export import onnx_probabilities

    proc, url = _serve(int8_serving_model, tmp_path / "serve.log", {})
    try:
        meta = httpx.post(f"{url}/metadata", timeout=30).json()
        image = image_bytes(3)
        answers = [httpx.post(f"{url}/predict", files={"file": ("x.jpg", image, "image/jpeg")}, timeout=30)
                   for _ in range(8)]
    finally:
        stop_server(proc)
    assert meta["precision"]["served"] == "int8" and "forces it" in meta["precision"]["why"]
    assert {a.headers["X-Model-Precision"] for a in answers} == {"int8"}
    model_dir = int8_serving_model.home / "models" / int8_serving_model.tag.replace(":", "/")
    expected = onnx_probabilities(serving_model_module.onnx_session(model_dir / "model.int8.onnx"),
                                  decode_image(image)[None])[0]
    got = np.array([answers[0].json()["probabilities"][c] for c in CLASSES])
    assert np.abs(got - expected).max() < 1e-5
@pytest.mark.parametrize("route", ["/predict", "/predict/", "/predict_batch", "/predict_batch/"])
def test_prediction_answers_name_the_bento_and_models_behind_them(server, serving_model, route):
    field = "files" if route.startswith("/predict_batch") else "file"
    resp = httpx.post(f"{server}{route}", files=[(field, ("car.png", image_bytes(6, fmt="PNG"), "image/png"))],
                      timeout=60, follow_redirects=False)
    assert resp.status_code == 200, resp.text
    assert {name: resp.headers.get(name) for name in lineage.HEADERS} == {
        "X-Bento-Tag": "not a bento", "X-BentoML-Model": serving_model.tag,
        "X-MLflow-Model": serving_model.labels["mlflow_model"],
        "X-MLflow-Model-Version": serving_model.labels["mlflow_version"],
        "X-MLflow-Run-Id": serving_model.labels["mlflow_run_id"], "X-Model-Precision": "float"}
    # ... the same identifiers /metadata gives
    meta = httpx.post(f"{server}/metadata", timeout=30).json()
    assert [resp.headers[name] for name in lineage.HEADERS] == [
        *(meta[key] for key in ("bento_tag", "bentoml_model_tag", "mlflow_model", "mlflow_version", "mlflow_run_id")),
        meta["precision"]["served"]]
    # A one-image answer also gives its label and confidence in headers (what the front door's shadow compares).
    if field == "file":
        body = resp.json()
        assert resp.headers["X-Predicted-Class"] == body["label"]
        assert abs(float(resp.headers["X-Confidence"]) - body["confidence"]) < 1e-6
    else:
        assert "X-Predicted-Class" not in resp.headers and "X-Confidence" not in resp.headers


def test_spec_and_page_text_document_the_lineage_headers(server):
    spec = httpx.get(f"{server}/docs.json", timeout=30).json()
    for path, named in (("/predict", {**lineage.HEADERS, **lineage.ANSWER_HEADERS}), ("/predict_batch", lineage.HEADERS)):
        headers = spec["paths"][path]["post"]["responses"]["200"]["headers"]
        assert list(headers) == list(named), path
        assert all(h["schema"] == {"type": "string"} and h["description"] for h in headers.values()), path
    assert "headers" not in spec["paths"]["/metadata"]["post"]["responses"]["200"]
    assert all(f"`{name}`" in spec["info"]["description"] for name in {**lineage.HEADERS, **lineage.ANSWER_HEADERS})


def test_swagger_health_and_metrics(server):
    assert httpx.get(f"{server}/", timeout=30).status_code == 200
    spec = httpx.get(f"{server}/docs.json", timeout=30).json()
    assert {"/predict", "/predict_batch", "/metadata"} <= set(spec["paths"])
    assert not any(path.endswith("/") and len(path) > 1 for path in spec["paths"])  # each route once
    # The page text is service.py's DESCRIPTION with this server's settings, not BentoML's README.
    description = spec["info"]["description"]
    assert description.startswith("Classifies an image into one of the ten CIFAR-10 classes"), description[:300]
    assert f"at most {MAX_FILES})" in description and f"over {MAX_BODY:,} bytes" in description
    assert "img.shields.io" not in json.dumps(spec) and "created with BentoML" not in description
    example = spec["components"]["schemas"]["Prediction"]["properties"]["label"]["examples"]
    assert example == ["automobile"]
    # The in-memory Upload type documents its parts as files, as a Path input does: Swagger's file picker.
    bodies = {path: spec["paths"][path]["post"]["requestBody"] for path in ("/predict", "/predict_batch")}
    form = {path: body["content"]["multipart/form-data"] for path, body in bodies.items()}
    binary = {"type": "string", "format": "binary", "minLength": 1}
    assert {k: form["/predict"]["schema"]["properties"]["file"][k] for k in binary} == binary
    files = form["/predict_batch"]["schema"]["properties"]["files"]
    assert files["items"] == binary and (files["minItems"], files["maxItems"]) == (1, MAX_FILES)
    # What the guard enforces: a body, no other fields, image parts.
    for (path, body), field in zip(bodies.items(), ("file", "files")):
        assert body["required"] is True and form[path]["schema"]["additionalProperties"] is False, path
        assert form[path]["encoding"] == {field: {"contentType": openapi.IMAGE_TYPES}}, path
    for path in ("/healthz", "/readyz", "/livez", "/metrics"):
        assert httpx.get(f"{server}{path}", timeout=30).status_code == 200, path
def test_spec_documents_one_error_shape_for_every_error_status(server):
    spec = httpx.get(f"{server}/docs.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    assert schemas["Error"] == openapi.ERROR_SCHEMA
    assert not {"InvalidArgument", "NotFound", "InternalServerError"} & set(schemas)  # BentoML's: `detail` a string
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    # 401 only where the server has a token (test_token_guards_the_api_and_metrics_not_health)
    for path, statuses in {"/predict": {"400", "408", "413", "429", "500", "503"},
                           "/predict_batch": {"400", "408", "413", "429", "500", "503"},
                           "/metadata": {"400", "408", "413", "429", "500", "503"}}.items():
        responses = spec["paths"][path]["post"]["responses"]
        assert set(responses) == {"200"} | statuses, path
        assert all(responses[status]["content"] == ref for status in statuses), path


def _error_answers(server: str) -> dict[str, tuple[int, httpx.Response]]:
    """One answer of every kind of refusal the service gives, 429 and 503 aside (the overload test's),
    with the status it must have."""
    jpeg = image_bytes(0)
    empty_form = {"content": b"--x--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}
    requests = {
        "no file (BentoML's validation)": ("/predict", empty_form, 400),
        "no files (BentoML's validation)": ("/predict_batch", empty_form, 400),
        "JSON instead of a form (BentoML's validation)": ("/predict", {"json": {"file": "x"}}, 400),
        "invalid JSON (BentoML's validation)": ("/metadata", {"content": b"\0",
                                                              "headers": {"Content-Type": "application/json"}}, 400),
        "not an object (BentoML's validation)": ("/metadata", {"json": [1]}, 400),
        "not an image (BadInput)": ("/predict", {"files": {"file": ("x.jpg", b"nope", "image/jpeg")}}, 400),
        "too many files (BadInput)": ("/predict_batch", {"files": [("files", (f"{i}.jpg", jpeg, "image/jpeg"))
                                                                  for i in range(MAX_FILES + 1)]}, 400),
        "unknown field (guard)": ("/predict", {"files": {"other": ("x.jpg", jpeg, "image/jpeg")}}, 400),
        "url-encoded (guard)": ("/predict", {"data": {"file": "http://127.0.0.1:9/x"}}, 400),
        "over the limit (guard)": ("/predict", {"content": b"\0" * (MAX_BODY + 1),
                                                "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 413),
    }
    return {name: (status, httpx.post(f"{server}{path}", timeout=30, **args))
            for name, (path, args, status) in requests.items()}
def test_every_error_answer_is_the_documented_error_object(server):
    """BentoML's own answers included: its validation errors carry `detail`, a list, where its spec says a string."""
    import jsonschema

    spec = httpx.get(f"{server}/docs.json", timeout=30).json()
    checked = _error_answers(server)
    for name, (status, resp) in checked.items():
        assert resp.status_code == status, (name, resp.status_code, resp.text)
        assert resp.headers["content-type"] == "application/json", name
        jsonschema.validate(resp.json(), spec["components"]["schemas"]["Error"])
    answers = {name: resp for name, (_, resp) in checked.items()}
    # BentoML's validation errors say where the problem is and what to send instead.
    assert answers["no files (BentoML's validation)"].json()["error"] == (
        "invalid request to /predict_batch: files: Field required; "
        "send images as multipart file parts (curl -F files=@image.png)")
    assert answers["JSON instead of a form (BentoML's validation)"].json()["error"].endswith(
        "not text; send images as multipart file parts (curl -F file=@image.png)")
    assert answers["invalid JSON (BentoML's validation)"].json()["error"].startswith(
        "invalid request to /metadata: body: Invalid JSON")
    assert "send an empty body" in answers["invalid JSON (BentoML's validation)"].json()["error"]
def test_api_routes_are_left_out_of_tracing_by_default(server):
    """CIFAR10_TRACE_REQUESTS=0 (default): no OpenTelemetry span for the API; other routes keep theirs."""
    assert ServingSettings.from_env({}).trace_requests == 0
    assert _predict(server, image_bytes(1)).status_code == 200
    assert httpx.get(f"{server}/docs.json", timeout=30).status_code == 200
    lines = SERVER_LOG[0].read_text().splitlines()
    api = [line for line in lines if "path=/predict," in line and "status=200" in line]
    docs = [line for line in lines if "path=/docs.json," in line]
    assert api and docs
    assert not any("trace=" in line for line in api) and all("trace=" in line for line in docs)
def test_overload_gives_429_and_503_never_500(serving_model, tmp_path):
    """Overload is refused (429 over max concurrency, 503 past the 1 ms queueing budget), never a 500."""
    proc, url = _serve(serving_model, tmp_path / "serve.log", {"CIFAR10_WORKERS": "1", "CIFAR10_MAX_CONCURRENCY": "3",
                                                              "CIFAR10_MAX_LATENCY_MS": "1"})
    images = [image_bytes(i, size=(256, 256)) for i in range(48)]

    async def burst() -> list[int]:
        # All 48 at once from one event loop: threads sending in turn kept fewer than 3 in flight
        # once the service answered faster (CI, after uploads moved to memory: 48 times 200).
        limits = httpx.Limits(max_connections=48)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            responses = await asyncio.gather(*(client.post("/predict", files={"file": ("img.jpg", data, "image/jpeg")})
                                               for data in images))
        return [r.status_code for r in responses], [r.json() for r in responses if r.status_code != 200]

    try:
        codes, bodies = asyncio.run(burst())
    finally:
        stop_server(proc)
    print("status counts:", {code: codes.count(code) for code in sorted(set(codes))})
    assert set(codes) <= {200, 429, 503}, codes
    assert 429 in codes, codes
    assert all(set(body) == {"error"} and isinstance(body["error"], str) for body in bodies), bodies


def test_the_service_imports_only_what_the_bento_ships():
    """The Bento ships service.py and serving/ (bentofile.yaml): anything else of the project is missing there."""
    import ast

    local = {p.stem for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    imported = set()
    for path in ["service.py", *(str(p.relative_to(ROOT)) for p in (ROOT / "serving").glob("*.py"))]:
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            imported |= {name.split(".")[0] for name in names}
    assert imported & local == {"serving"}, sorted(imported & local)
