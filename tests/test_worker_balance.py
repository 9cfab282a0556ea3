"""WorkerBalance: a worker over its share of in-flight requests asks clients to reconnect."""

from __future__ import annotations

import asyncio

import bentoml

from training.worker_balance import WorkerBalance


def _app(gate: asyncio.Event):
    async def app(scope, receive, send):
        await gate.wait()  # stay in flight until the test lets go
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
    return app


def _worker(index: int, gate: asyncio.Event, tmp_path, monkeypatch) -> WorkerBalance:
    balance = WorkerBalance(_app(gate), workers=2, slack=2, table_dir=str(tmp_path))
    monkeypatch.setattr(bentoml.server_context, "worker_index", index)
    assert balance._attach()  # maps the table now, as worker `index` would on its first request
    return balance


async def _request(balance: WorkerBalance) -> list[tuple[bytes, bytes]]:
    sent = []

    async def send(message):
        sent.append(message)

    await balance({"type": "http", "path": "/predict", "headers": []}, None, send)
    return sent[0]["headers"]


def test_a_worker_over_its_share_closes_connections_and_a_fair_one_keeps_them(tmp_path, monkeypatch):
    async def main():
        gate = asyncio.Event()
        busy, idle = _worker(1, gate, tmp_path, monkeypatch), _worker(2, gate, tmp_path, monkeypatch)
        # Six requests in flight on worker 1, one on worker 2: fair share 3.5 (+2 slack).
        busy_tasks = [asyncio.create_task(_request(busy)) for _ in range(6)]
        idle_task = asyncio.create_task(_request(idle))
        await asyncio.sleep(0.01)
        assert list(busy._table) == [6, 1]  # both workers see the same table
        assert busy.over_share() and not idle.over_share()
        gate.set()
        return await asyncio.gather(*busy_tasks), await idle_task, list(busy._table)

    busy_headers, idle_headers, table_after = asyncio.run(main())
    assert (b"connection", b"close") in busy_headers[0]  # answered while worker 1 held 6 of 7
    assert (b"connection", b"close") not in idle_headers
    assert table_after == [0, 0]  # finished requests leave the count


def test_balancing_is_off_outside_a_bentoml_worker(tmp_path, monkeypatch):
    monkeypatch.setattr(bentoml.server_context, "worker_index", None)

    async def main():
        gate = asyncio.Event()
        gate.set()
        balance = WorkerBalance(_app(gate), workers=2, table_dir=str(tmp_path))
        return await _request(balance), balance

    headers, balance = asyncio.run(main())
    assert (b"connection", b"close") not in headers and balance._table is None
    assert list(tmp_path.iterdir()) == []  # no shared table was created
