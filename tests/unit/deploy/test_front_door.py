"""The front door's nginx configuration (training/deploy/proxy.py) and the follower's decisions
(training/deploy/follow.py). No server starts here: tests/e2e/test_front_door.py runs nginx and the follower."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.helpers import require
from training.deploy import follow, proxy
from training.deploy.follow import Served, decide


def _env(tmp_path, **more: str) -> dict[str, str]:
    return {"STACK_RUN": str(tmp_path), "STACK_HOST": "127.0.0.9", "PROXY_PORT": "3000", **more}


def _directives(text: str) -> dict[str, list[str]]:
    """Each directive's values, in order of appearance (``listen`` may appear once per server)."""
    found: dict[str, list[str]] = {}
    for name, value in re.findall(r"^\s*([a-z_0-9]+)\s+([^;{]*?)\s*;", text, re.M):
        found.setdefault(name, []).append(value)
    return found


def test_every_limit_is_set_and_the_upstream_is_the_loopback_slot(tmp_path):
    conf = _directives(proxy.render(_env(tmp_path), "127.0.0.1:3001"))
    assert conf["listen"] == ["127.0.0.9:3000"] and conf["daemon"] == ["off"]
    assert conf["server"] == ["127.0.0.1:3001 max_fails=0"]
    for name in ("client_header_timeout", "client_body_timeout"):
        assert conf[name] == [f"{proxy.CLIENT_TIMEOUT_S}s"], name
    assert conf["keepalive_timeout"] == [f"{proxy.KEEPALIVE_S}s", "4s"]  # clients', then the Bento connections'
    assert conf["worker_rlimit_nofile"] == [str(2 * proxy.WORKER_CONNECTIONS + 64)]
    assert conf["worker_shutdown_timeout"] == [f"{proxy.UPSTREAM_READ_S}s"]  # a reload's drain ends
    assert conf["keepalive_requests"] == [str(proxy.KEEPALIVE_REQUESTS)]
    assert conf["worker_connections"] == [str(proxy.WORKER_CONNECTIONS)]
    assert conf["limit_conn"] == [f"per_address {proxy.CONN_PER_ADDRESS}", f"all {proxy.CONN_TOTAL}"]
    assert conf["limit_conn_status"] == ["429"]
    assert conf["client_max_body_size"] == [str(10 * 1024 * 1024)]  # the service's own default
    assert conf["proxy_next_upstream"] == ["off"]  # a POST is never sent twice
    assert conf["access_log"] == [f"{tmp_path}/proxy-access.log front"]
    assert conf["proxy_set_header"][:4] == ['Connection ""', "Host $host", "Authorization $http_authorization",
                                            "X-Forwarded-For $remote_addr"]
    assert "ssl_certificate" not in conf


def test_the_body_limit_follows_the_services_setting(tmp_path):
    conf = _directives(proxy.render(_env(tmp_path, CIFAR10_MAX_BODY_BYTES="2048"), "127.0.0.1:1"))
    assert conf["client_max_body_size"] == ["2048"]


def test_tls_only_with_both_certificate_and_key(tmp_path):
    conf = _directives(proxy.render(_env(tmp_path, CIFAR10_TLS_CERT="c.pem", CIFAR10_TLS_KEY="k.pem"), "127.0.0.1:1"))
    assert conf["listen"] == ["127.0.0.9:3000 ssl"]
    assert conf["ssl_certificate"][0].endswith("/c.pem") and conf["ssl_certificate_key"][0].endswith("/k.pem")
    assert conf["ssl_protocols"] == ["TLSv1.2 TLSv1.3"]
    with pytest.raises(SystemExit, match="both"):
        proxy.render(_env(tmp_path, CIFAR10_TLS_CERT="c.pem"), "127.0.0.1:1")


def test_workers_run_as_root_only_when_nginx_is_started_by_root(tmp_path):
    assert "user root;" in proxy.render(_env(tmp_path), "127.0.0.1:1", as_root=True)
    assert not re.search(r"^user ", proxy.render(_env(tmp_path), "127.0.0.1:1", as_root=False), re.M)


def test_nginx_itself_accepts_the_configuration(tmp_path):
    require(proxy.nginx_binary() is not None, "no nginx: run .ci/setup-nginx.sh (Debian's nginx)")
    binary = proxy.nginx_binary()
    path = proxy.write(_env(tmp_path, STACK_HOST="127.0.0.1"), 3001)
    done = subprocess.run([binary, "-t", "-c", str(path), "-e", "stderr", "-p", f"{tmp_path}/nginx/"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    before = path.stat().st_mtime_ns
    proxy.write(_env(tmp_path, STACK_HOST="127.0.0.1"), 3001)  # unchanged: not rewritten
    assert path.stat().st_mtime_ns == before


def test_a_slot_is_chosen_beside_the_one_that_serves():
    assert follow.other(None) == "blue" and follow.other("blue") == "green" and follow.other("green") == "blue"
    env = {"BENTO_PORT": "3001"}
    assert (follow.slot_port(env, "blue"), follow.slot_port(env, "green")) == (3001, 3002)


@pytest.mark.parametrize("served, champion, failed, expected", [
    (Served("blue", "b:1", "1"), "1", {}, "stay"),  # the alias names what is served
    (Served("blue", "b:1", "1"), "", {}, "stay"),  # no champion (or no answer): keep serving
    (Served("blue", "b:1", "1"), "2", {}, "switch"),  # a promotion
    (Served("green", "b:2", "2"), "1", {}, "switch"),  # a rollback
    (Served(), "1", {}, "switch"),  # nothing served yet: the first champion starts
    (Served("blue", "b:1", ""), "1", {}, "switch"),  # just started: the lookup finds the same Bento, no restart
    (Served("blue", "b:1", "1"), "2", {"2": 990.0}, "wait"),  # its Bento failed to start 10 s ago
    (Served("blue", "b:1", "1"), "2", {"2": 1000.0 - follow.RETRY_AFTER_S}, "switch"),  # tried again after it
])
def test_the_follower_switches_only_when_the_alias_names_another_version(served, champion, failed, expected):
    assert decide(served, champion, failed, now=1000.0) == expected


def test_a_pinned_bento_is_served_whatever_the_alias_says():
    assert decide(Served("blue", "b:1", "1"), "2", {}, 1000.0, pinned="b:1") == "stay"
    assert decide(Served("blue", "b:1", "1"), "1", {}, 1000.0, pinned="b:9") == "switch"


class _Supervisor:
    """supervisord's RPC as the follower uses it, recording every call."""

    def __init__(self):
        self.calls, self.states = [], {}

    def getProcessInfo(self, name):
        return {"statename": self.states.get(name, "STOPPED"), "pid": 0}

    def startProcess(self, name, wait):
        self.calls.append(("start", name))
        self.states[name] = "RUNNING"

    def stopProcess(self, name, wait):
        self.calls.append(("stop", name))
        self.states[name] = "STOPPED"

    def signalProcess(self, name, signal):
        self.calls.append(("signal", name, signal))


def _follower(tmp_path, monkeypatch, champion: str, tag: str, ready: bool = True):
    rpc = type("RPC", (), {"supervisor": _Supervisor()})()
    f = follow.Follower({**_env(tmp_path), "BENTO_PORT": "3001"}, rpc)
    monkeypatch.setattr(f, "champion", lambda: champion)
    monkeypatch.setattr(f, "champion_tag", lambda: tag)
    monkeypatch.setattr(f, "_ready", lambda slot, limit: ready)
    return f, rpc.supervisor


def test_a_switch_starts_the_new_slot_before_the_proxy_moves_and_stops_the_old_one_last(tmp_path, monkeypatch):
    f, sup = _follower(tmp_path, monkeypatch, "2", "b:2")
    sup.states.update({"bento:bento-blue": "RUNNING", "proxy:switch": "RUNNING"})
    monkeypatch.setattr(shutil, "which", lambda *a, **k: "/bin/true")  # `nginx -t`: accepted
    after = f.step(Served("blue", "b:1", "1"))
    assert after == Served("green", "b:2", "2") == follow.load(tmp_path)
    assert (tmp_path / "bento-green.tag").read_text().strip() == "b:2"
    assert sup.calls == [("start", "bento:bento-green"), ("signal", "proxy:switch", "HUP"), ("stop", "bento:bento-blue")]
    assert "server 127.0.0.1:3002 " in (tmp_path / "switch.conf").read_text()


def test_a_bento_that_never_gets_ready_is_stopped_and_the_old_one_keeps_serving(tmp_path, monkeypatch):
    f, sup = _follower(tmp_path, monkeypatch, "2", "b:2", ready=False)
    sup.states.update({"bento:bento-blue": "RUNNING", "proxy:switch": "RUNNING"})
    served = Served("blue", "b:1", "1")
    assert f.step(served) == served
    assert sup.calls == [("start", "bento:bento-green"), ("stop", "bento:bento-green")]
    assert decide(served, "2", f.failed, now=__import__("time").monotonic()) == "wait"


def test_an_alias_moved_to_a_version_with_the_served_bento_only_updates_the_record(tmp_path, monkeypatch):
    f, sup = _follower(tmp_path, monkeypatch, "3", "b:1")
    sup.states["bento:bento-blue"] = "RUNNING"
    assert f.step(Served("blue", "b:1", "")) == Served("blue", "b:1", "3")
    assert sup.calls == []


def test_a_configuration_nginx_refuses_is_never_put_in_place_and_the_old_slot_keeps_serving(tmp_path, monkeypatch):
    f, sup = _follower(tmp_path, monkeypatch, "2", "b:2")
    sup.states.update({"bento:bento-blue": "RUNNING", "proxy:switch": "RUNNING"})
    proxy.write(f.env, 3001)  # what nginx runs now: the blue slot
    before = (tmp_path / "switch.conf").read_text()
    monkeypatch.setattr(shutil, "which", lambda *a, **k: "/bin/false")  # `nginx -t`: refused
    served = Served("blue", "b:1", "1")
    assert f.step(served) == served
    assert (tmp_path / "switch.conf").read_text() == before
    assert sup.calls[:2] == [("start", "bento:bento-green"), ("stop", "bento:bento-green")]
    assert ("signal", "proxy:switch", "HUP") not in sup.calls and sup.states["bento:bento-blue"] == "RUNNING"
