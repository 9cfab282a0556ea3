"""Connection balance: a worker over its share of the server's connections closes one, never one within it."""

from __future__ import annotations

import random

from serving.balance import CLOSE_EVERY_S, WINDOW_S, ConnectionBalance, slack


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def workers(tmp_path, clock: Clock, count: int = 2, told: int | None = None) -> list[ConnectionBalance]:
    started = [ConnectionBalance("k", told or count, i + 1, tmp_path, clock=clock) for i in range(count)]
    for worker in started:
        worker.start(heartbeat=False)
    return started


def clients(count: int, start: int = 0) -> list[tuple]:
    return [("127.0.0.1", 40000 + start + i) for i in range(count)]


def run(balance: list[ConnectionBalance], held: list[list[tuple]], clock: Clock, rounds: int,
        lands=lambda closer, count: (closer + 1) % count) -> int:
    """Closed-loop clients, one request per connection per round (1 ms apart); a closed connection
    reconnects where ``lands`` says (the next worker: the idle one waiting in accept). Returns the closes."""
    closes = 0
    for _ in range(rounds):
        for worker in balance:
            worker.beat()
        for i, worker in enumerate(balance):
            for client in list(held[i]):
                clock.now += 0.001
                if worker.should_close(client):
                    closes += 1
                    held[i].remove(client)
                    held[lands(i, len(balance))].append(client)
    return closes


def test_a_worker_holding_every_connection_sheds_down_to_its_share_without_moving_any_back(tmp_path):
    clock = Clock()
    balance, held = workers(tmp_path, clock), [clients(32), []]
    closes = run(balance, held, clock, rounds=30)  # ~1 s of traffic
    assert sorted(map(len, held)) == [16 - 2, 16 + 2]  # within the slack of an even split
    assert closes == 16 - 2  # each close moved one connection the right way: none came back
    assert run(balance, held, clock, rounds=10) == 0  # and once spread, nothing moves


def test_four_workers_spread_even_when_reconnections_land_anywhere(tmp_path):
    clock, rng = Clock(), random.Random(0)
    balance, held = workers(tmp_path, clock, count=4), [clients(64), [], [], []]
    run(balance, held, clock, rounds=60, lands=lambda closer, count: rng.randrange(count))
    assert max(map(len, held)) <= 16 + slack(16) and min(map(len, held)) >= 8, list(map(len, held))


def test_an_even_split_never_closes(tmp_path):
    clock = Clock()
    balance = workers(tmp_path, clock)
    run(balance, [clients(16), clients(16, start=100)], clock, rounds=2)  # both counted
    assert run(balance, [clients(16), clients(16, start=100)], clock, rounds=20) == 0


def test_at_most_one_close_per_interval(tmp_path):
    clock = Clock()
    busy, _ = workers(tmp_path, clock)
    for _ in range(2):  # counted from a connection's second request
        decisions = [busy.should_close(c) for c in clients(32)]  # 32 requests within one instant
    assert decisions.count(True) == 1
    clock.now += CLOSE_EVERY_S * 1.01
    assert busy.should_close(clients(1, start=1)[0])


def test_connections_that_send_one_request_each_are_never_counted(tmp_path):
    """A client that opens a connection per request (or a proxy without keep-alive) is no imbalance to move."""
    clock = Clock()
    busy, _ = workers(tmp_path, clock)
    for i in range(500):
        clock.now += 0.001
        assert not busy.should_close(("127.0.0.1", 30000 + i))


def test_forwarded_addresses_are_never_counted(tmp_path):
    """uvicorn gives port 0 to an address it took from X-Forwarded-For, which a local client may set at will."""
    clock = Clock()
    busy, _ = workers(tmp_path, clock)
    for _ in range(3):
        assert not any(busy.should_close((f"10.0.0.{i}", 0)) for i in range(64))


def test_idle_connections_and_silent_workers_stop_counting(tmp_path):
    """A worker writes its count only when it answers: one it published a window ago must not hide an
    imbalance (a benchmark's warm-up left 29 there, and the next run's 32 connections stayed on one worker)."""
    clock = Clock()
    busy, idle = workers(tmp_path, clock)
    for _ in range(2):
        for c in clients(29, start=100):
            idle.should_close(c)
    clock.now += WINDOW_S + 1
    held = [clients(32), []]
    run([busy, idle], held, clock, rounds=30)
    assert sorted(map(len, held)) == [16 - 2, 16 + 2]


def test_the_share_is_over_the_workers_alive(tmp_path):
    """Told 2 workers where BentoML runs 1 (its workers overridden elsewhere): the lone worker keeps its connections."""
    clock = Clock()
    (lone,) = workers(tmp_path, clock, count=1, told=2)
    assert run([lone], [clients(32)], clock, rounds=20) == 0


def test_off_outside_a_multi_worker_server(tmp_path):
    assert not ConnectionBalance("k", 1, 1, tmp_path).on  # one worker: nothing to balance
    assert not ConnectionBalance("k", 2, None, tmp_path).on  # no worker index: not under `bentoml serve`
    assert not ConnectionBalance("k", 2, 3, tmp_path).on  # a third worker where two were said: no slot of its own
    lone = ConnectionBalance("k", 2, None, tmp_path)
    lone.start()
    assert not any(lone.should_close(c) for c in clients(64) * 2)
    assert not list(tmp_path.iterdir())  # and it created nothing


def test_a_table_it_cannot_map_turns_balancing_off(tmp_path):
    worker = ConnectionBalance("k", 2, 1, tmp_path / "missing")
    worker.start()
    assert not worker.on
    assert not any(worker.should_close(c) for c in clients(64) * 2)


def test_a_client_given_as_a_list_is_the_same_connection(tmp_path):
    clock = Clock()
    busy, _ = workers(tmp_path, clock)
    for c in clients(8):  # one request each as lists, a second as tuples: counted once each, so 8 > 4 + 2
        busy.should_close(list(c))
    assert [busy.should_close(c) for c in clients(8)].count(True) == 1
