"""WorkerBalance: a worker over its share of active connections asks clients to reconnect."""

from __future__ import annotations

import asyncio

import bentoml

from training.worker_balance import WorkerBalance


async def _app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _worker(index: int, tmp_path, monkeypatch, window_s: float = 60.0) -> WorkerBalance:
    balance = WorkerBalance(_app, workers=2, slack=2, window_s=window_s, table_dir=str(tmp_path))
    monkeypatch.setattr(bentoml.server_context, "worker_index", index)
    assert balance._attach()  # maps the table now, as worker `index` would on its first request
    return balance


async def _reads_the_body_then_answers(scope, receive, send):
    while (await receive()).get("more_body"):
        pass
    await _app(scope, receive, send)


def _request(balance: WorkerBalance, port: int, body: list[bytes] | None = None) -> list[tuple[bytes, bytes]]:
    """Send one request (``body``: its pieces, as uvicorn would deliver them); return the answer's headers."""
    sent, pieces = [], list(body or [])

    async def receive():
        piece = pieces.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    async def send(message):
        sent.append(message)

    headers = [(b"content-length", str(sum(map(len, body))).encode())] if body else []
    scope = {"type": "http", "path": "/predict", "headers": headers, "client": ("127.0.0.1", port)}
    asyncio.run(balance(scope, receive, send))
    assert sent[-1]["type"] == "http.response.body"  # the answer itself is untouched
    return sent[0]["headers"]


def _closes(headers) -> bool:
    return (b"connection", b"close") in headers


def test_a_worker_over_its_share_of_connections_closes_one_and_a_fair_one_keeps_them(tmp_path, monkeypatch):
    busy, idle = _worker(1, tmp_path, monkeypatch), _worker(2, tmp_path, monkeypatch)
    assert not _closes(_request(idle, 6000))
    assert not any(_closes(_request(busy, port)) for port in range(5000, 5005))  # 5 of 6: within 3 + 2
    assert list(busy._table) == [5, 1]  # both workers see the same table
    # A sixth connection: 6 > 7 / 2 + 2, so worker 1 asks this client to reconnect.
    assert _closes(_request(busy, 5005))
    assert list(busy._table) == [5, 1]  # the closed connection no longer counts
    assert not _closes(_request(idle, 6001))  # worker 2 is below its share
    assert not _closes(_request(busy, 5000))  # a connection worker 1 keeps goes on as before


def test_an_answer_before_the_body_was_read_keeps_the_connection(tmp_path, monkeypatch):
    """Closing with body bytes still in flight resets the connection: the client would lose the answer."""
    busy = _worker(1, tmp_path, monkeypatch)
    for port in range(5000, 5010):  # 10 connections on worker 1, none on worker 2: far over its share
        _request(busy, port)
    assert not _closes(_request(busy, 5010, body=[b"part 1", b"part 2"]))  # _app answers without reading
    busy.app = _reads_the_body_then_answers
    assert _closes(_request(busy, 5011, body=[b"part 1", b"part 2"]))


def test_connections_idle_for_a_window_stop_counting(tmp_path, monkeypatch):
    busy = _worker(1, tmp_path, monkeypatch, window_s=0.05)
    for port in range(5000, 5004):
        _request(busy, port)
    assert busy._table[0] == 4
    asyncio.run(asyncio.sleep(0.1))
    _request(busy, 5000)
    assert busy._table[0] == 1


def test_balancing_is_off_outside_a_bentoml_worker(tmp_path, monkeypatch):
    monkeypatch.setattr(bentoml.server_context, "worker_index", None)
    balance = WorkerBalance(_app, workers=2, table_dir=str(tmp_path))
    assert not _closes(_request(balance, 5000))
    assert balance._table is None and list(tmp_path.iterdir()) == []  # no shared table was created


def test_a_table_that_cannot_be_mapped_turns_balancing_off_and_says_where(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(bentoml.server_context, "worker_index", 1)
    balance = WorkerBalance(_app, workers=2, table_dir=str(tmp_path / "missing"))
    with caplog.at_level("WARNING", logger="training.worker_balance"):
        assert not _closes(_request(balance, 5000))  # the request is still answered
    assert balance.workers == 1 and balance._table is None
    assert "worker balancing off: cannot map" in caplog.text and str(tmp_path / "missing") in caplog.text
