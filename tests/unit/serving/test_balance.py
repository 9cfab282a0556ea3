"""Connection balance: a worker over its share of the server's connections closes one, never one within it."""

from __future__ import annotations

import pytest

from serving import balance
from serving.balance import CLOSE_EVERY_S, SLACK, WINDOW_S, ConnectionBalance


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(balance.time, "monotonic", lambda: now[0])
    return now


def clients(count: int, start: int = 0) -> list[tuple]:
    return [("127.0.0.1", 40000 + start + i) for i in range(count)]


def run(workers: list[ConnectionBalance], held: list[list[tuple]], clock, rounds: int) -> int:
    """Closed-loop clients, one request per connection per round (1 ms apart); a closed connection
    reconnects to the next worker, as the idle worker waiting in accept takes it. Returns the closes."""
    closes = 0
    for _ in range(rounds):
        for i, worker in enumerate(workers):
            for client in list(held[i]):
                clock[0] += 0.001
                if worker.should_close(client):
                    closes += 1
                    held[i].remove(client)
                    held[(i + 1) % len(workers)].append(client)
    return closes


def test_a_worker_holding_every_connection_sheds_down_to_its_share_without_moving_any_back(tmp_path, clock):
    workers = [ConnectionBalance("k", 2, 1, tmp_path), ConnectionBalance("k", 2, 2, tmp_path)]
    held = [clients(32), []]
    closes = run(workers, held, clock, rounds=30)  # ~1 s of traffic
    assert sorted(map(len, held)) == [16 - SLACK, 16 + SLACK]  # within the slack of an even split
    assert closes == 16 - SLACK  # each close moved one connection the right way: none came back
    assert run(workers, held, clock, rounds=10) == 0  # and once spread, nothing moves


def test_an_even_split_never_closes(tmp_path, clock):
    workers = [ConnectionBalance("k", 2, 1, tmp_path), ConnectionBalance("k", 2, 2, tmp_path)]
    run(workers, [clients(16), clients(16, start=100)], clock, rounds=1)  # both counted
    assert run(workers, [clients(16), clients(16, start=100)], clock, rounds=20) == 0


def test_at_most_one_close_per_interval(tmp_path, clock):
    busy = ConnectionBalance("k", 2, 1, tmp_path)
    decisions = [busy.should_close(c) for c in clients(32)]  # 32 requests within one instant
    assert decisions.count(True) == 1
    clock[0] += CLOSE_EVERY_S * 1.01
    assert busy.should_close(clients(1, start=500)[0])


def test_idle_connections_stop_counting(tmp_path, clock):
    a, b = ConnectionBalance("k", 2, 1, tmp_path), ConnectionBalance("k", 2, 2, tmp_path)
    b.should_close(("127.0.0.1", 1))
    assert not any(a.should_close(c) for c in clients(4))
    clock[0] += WINDOW_S + 1  # that burst went idle: 4 new connections are no excess (the old 4 no longer count)
    assert not any(a.should_close(c) for c in clients(4, start=10))


def test_off_outside_a_multi_worker_server(tmp_path):
    assert not ConnectionBalance("k", 1, 1, tmp_path).on  # one worker: nothing to balance
    assert not ConnectionBalance("k", 2, None, tmp_path).on  # no worker index: not under `bentoml serve`
    lone = ConnectionBalance("k", 2, None, tmp_path)
    assert not any(lone.should_close(c) for c in clients(64))
    assert not list(tmp_path.iterdir())  # and it created nothing


def test_a_table_it_cannot_map_turns_balancing_off(tmp_path):
    worker = ConnectionBalance("k", 2, 1, tmp_path / "missing")
    assert not any(worker.should_close(c) for c in clients(64))
    assert not worker.on


def test_a_worker_that_takes_no_request_stops_counting_after_the_window(tmp_path, clock):
    """Its slot is written only when it answers: a count it published a window ago must not hide an imbalance
    (a benchmark's warm-up left 29 there, and the next run's 32 connections then stayed on one worker)."""
    busy, idle = ConnectionBalance("k", 2, 1, tmp_path), ConnectionBalance("k", 2, 2, tmp_path)
    for c in clients(29, start=100):
        idle.should_close(c)
    clock[0] += WINDOW_S + 1
    held = [clients(32), []]
    run([busy, idle], held, clock, rounds=30)
    assert sorted(map(len, held)) == [16 - SLACK, 16 + SLACK]


def test_a_client_given_as_a_list_is_counted_not_refused(tmp_path):
    worker = ConnectionBalance("k", 2, 1, tmp_path)
    assert worker.should_close(["127.0.0.1", 1]) is False  # a list is no dict key: counted as a tuple
