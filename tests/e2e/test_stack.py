"""The process manager behind `make up/down/status`, on the local stack's MLflow server (the cheapest part).

A program that crashes is restarted and `make status` shows it; a process manager that is killed (as by a
crash or a reboot) leaves no pid file that `make down` trusts: `down` stops the programs it had started,
found by the manager's socket in their environment, and nothing else, even an unrelated process whose pid
the manager's own pid file now names; `make up` works again afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import requests

from tests.helpers import ROOT, free_port, stack_processes, state_env, wait_until


def _make(state, *args: str) -> subprocess.CompletedProcess:
    # The make targets point MLflow and the rest into STATE themselves.
    env = {k: v for k, v in state_env(state).items() if not k.startswith(("AIRFLOW", "MLFLOW_", "BENTOML_", "CIFAR10_STATE"))}
    return subprocess.run(["make", "--no-print-directory", *args, f"STATE={state}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def _serves(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def test_a_crash_shows_in_make_status_and_down_after_a_dead_manager_stops_only_its_own(tmp_path):
    state, port = tmp_path / "state", free_port()
    up = _make(state, "up", "PARTS=mlflow", f"MLFLOW_PORT={port}")
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        assert up.returncode == 0, (up.stdout + up.stderr)[-3000:]
        status = _make(state, "status")
        assert re.search(r"^mlflow +RUNNING +pid \d+", status.stdout, re.M), status.stdout
        assert re.search(r"^bento:bento-blue +STOPPED", status.stdout, re.M), status.stdout
        assert not [p.name for p in (state / "stack").glob("*.pid") if p.name != "supervisord.pid"]

        # A crash of the program, workers and all: the manager restarts it and says so.
        first = stack_processes(state)["mlflow"]
        os.killpg(first, signal.SIGKILL)
        again = wait_until("mlflow restarted",
                           lambda: (pid := stack_processes(state).get("mlflow", first)) != first and pid, 120)
        status = _make(state, "status", "PARTS=mlflow")
        assert status.returncode == 0 and f"RUNNING   pid {again}," in status.stdout, status.stdout
        assert "exited: mlflow (terminated by SIGKILL; not expected)" in (state / "stack" / "supervisord.log").read_text()
        wait_until("the restarted server", lambda: _serves(port), 120)

        # The manager dies; its pid file now names an unrelated process, as after a reboot.
        manager = stack_processes(state)["supervisord"]
        os.kill(manager, signal.SIGKILL)
        wait_until("the manager gone", lambda: not stack_processes(state), 120)
        (state / "stack" / "supervisord.pid").write_text(f"{unrelated.pid}\n")
        assert "RUNNING" not in _make(state, "status").stdout  # supervisorctl: its socket refuses connections
        assert _serves(port)  # its program outlived it
        down = _make(state, "down")
        assert down.returncode == 0, down.stderr
        assert "left by a supervisord that had died" in down.stdout, down.stdout
        wait_until("the orphaned server stopped", lambda: not _serves(port), 60)
        assert unrelated.poll() is None, "down signalled a process it had not started"

        # A fresh manager starts over the stale socket, and a clean down leaves nothing.
        up = _make(state, "up", "PARTS=mlflow", f"MLFLOW_PORT={port}")
        assert up.returncode == 0, (up.stdout + up.stderr)[-3000:]
        assert _serves(port)
    finally:
        down = _make(state, "down")
        unrelated.kill()
        unrelated.wait()
    assert down.returncode == 0 and not stack_processes(state) and not _serves(port)
    assert not list((state / "stack").glob("*.pid")) and not (state / "stack" / "supervisor.sock").exists()
