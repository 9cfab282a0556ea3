"""Each stack's process description, rendered with the settings the stack module makes, loads in supervisord
and names the parts the deployment descriptions name; `down` after a dead supervisord signals only what it had
started. No server starts here (tests/e2e/test_stack.py runs the manager)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest

from tests.helpers import ROOT
from training.deploy.stack import PARTS, programs, render, settings, sweep

HOST = "127.0.0.9"  # any address: every listener must take STACK_HOST's


def _programs(stack: str, tmp_path) -> dict[str, object]:
    """supervisord's own reading of the stack's description, with the environment the stack module gives it:
    ``group:program`` -> its configuration (with its group's priority as ``group_priority``)."""
    from supervisor.options import ServerOptions

    state = tmp_path / stack
    (state / "stack").mkdir(parents=True)
    env = settings(stack, {"CIFAR10_STATE_DIR": str(state), "STACK_HOST": HOST, "PATH": os.environ["PATH"]})
    with mock.patch.dict(os.environ, env, clear=True):
        options = ServerOptions()
        options.realize(args=["-c", str(render({**env, "STACK_BENTO": "cifar10-classifier:abc"}))])
    assert options.identifier == f"cifar10-{stack}"
    return {f"{group.name}:{p.name}": SimpleNamespace(**vars(p), group_priority=group.priority)
            for group in options.process_group_configs for p in group.process_configs}


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stacks")
    return {stack: _programs(stack, tmp) for stack in PARTS}


def test_each_stack_runs_its_parts_as_programs(described):
    assert set(described["local"]) == {"airflow:airflow-api-server", "airflow:airflow-scheduler", "mlflow:mlflow",
                                       "airflow:airflow-dag-processor", "airflow:airflow-triggerer", "bento:bento-blue",
                                       "bento:bento-green", "bento:follow", "proxy:proxy", "proxy:switch"}
    assert set(described["distributed"]) == set(described["local"]) | {"redis:redis", "s3:s3",
                                                                     "airflow:airflow-worker"}
    # `up PART` starts supervisord's group of that name; postgres is databases only, no process.
    for stack, programs in described.items():
        assert {name.split(":")[0] for name in programs} == set(PARTS[stack]) - {"postgres"}


def test_programs_start_only_when_asked_restart_and_stop_with_their_process_group(described, tmp_path):
    for stack, programs in described.items():
        for name, program in programs.items():
            assert not program.autostart and program.autorestart, name
            assert program.stopasgroup and program.killasgroup, name  # workers and task processes too
            assert program.redirect_stderr and program.stdout_logfile.endswith(f"/stack/{program.name}.log"), name
    # Stopped last started first: the front door, the Bento, then Airflow, then what they use.
    distributed = described["distributed"]
    order = [distributed[name].group_priority for name in ("proxy:proxy", "bento:bento-blue", "airflow:airflow-worker",
                                                           "mlflow:mlflow", "s3:s3", "redis:redis")]
    assert order == sorted(order, reverse=True) and len(set(order)) == len(order)
    # nginx stops gracefully (QUIT: requests in flight are answered), every other program on TERM.
    for stack, programs in described.items():
        assert {name: p.stopsignal for name, p in programs.items() if p.stopsignal != 15} == {"proxy:proxy": 3, "proxy:switch": 3}


def test_every_listener_binds_stack_host_and_no_log_server_starts(described):
    for stack, programs in described.items():
        commands = {name.split(":")[1]: program.command for name, program in programs.items()}
        assert "0.0.0.0" not in " ".join(commands.values())
        assert f"--host {HOST}" in commands["airflow-api-server"] and f"--host {HOST}" in commands["mlflow"]
        # The Bento's slots are behind the proxy: they bind loopback (follow.serve_slot), nginx STACK_HOST.
        assert commands["bento-blue"] == "python -m training.deploy.follow slot blue"
        assert re.fullmatch(r"\S*nginx -c \S+/stack/nginx.conf -e stderr -p \S+/stack/nginx/", commands["proxy"])
        for name in ("airflow-scheduler", "airflow-triggerer", "airflow-worker"):
            assert name not in commands or "--skip-serve-logs" in commands[name], name
    distributed = {name.split(":")[1]: p.command for name, p in described["distributed"].items()}
    assert f"--bind {HOST}" in distributed["redis"]
    assert f"-ip.bind={HOST}" in distributed["s3"] and "-disableHttp" in distributed["s3"]
    assert "--app-name basic-auth" in distributed["mlflow"]


def _stack_comments(text: str) -> dict[str, str]:
    """``service -> program`` from the `# stack:` comment under each compose service."""
    return dict(re.findall(r"^  ([\w-]+):\n    # stack: ([\w-]+)", text, re.M))


def test_compose_and_kubernetes_name_the_same_parts_as_the_stack(described):
    """Each deployment description says which stack program it is; together they name every one."""
    compose = (ROOT / "deploy" / "compose.yaml").read_text()
    import yaml

    services = yaml.safe_load(compose)["services"]
    named = _stack_comments(compose)
    assert set(named) == set(services), f"services without a `# stack:` comment: {set(services) - set(named)}"
    described = {name.split(":")[1] for name in described["distributed"]}
    # One host keeps two Bento slots, a follower and a switch nginx that moves between them; compose runs one
    # Bento container (its `# stack:` names the slot a fresh start serves), Kubernetes rolls out a Deployment.
    assert set(named.values()) - {"none"} == described - {"bento-green", "follow", "switch"}
    k8s = re.findall(r"^# stack: ([\w-]+)", (ROOT / "deploy" / "k8s" / "bento.yaml").read_text(), re.M)
    assert k8s and set(k8s) <= described


def test_the_comparison_can_fail():
    assert _stack_comments("services:\n  bento:\n    # stack: bento\n  s3:\n    image: x\n") == {"bento": "bento"}


def test_secrets_are_made_once_private_and_a_variable_from_the_environment_wins(tmp_path):
    first = settings("distributed", {"CIFAR10_STATE_DIR": str(tmp_path)})
    secrets = tmp_path / "stack" / "secrets.env"
    assert secrets.stat().st_mode & 0o777 == 0o600
    again = settings("distributed", {"CIFAR10_STATE_DIR": str(tmp_path), "AWS_SECRET_ACCESS_KEY": "given"})
    assert again["AIRFLOW__CORE__FERNET_KEY"] == first["AIRFLOW__CORE__FERNET_KEY"]
    assert again["MLFLOW_TRACKING_PASSWORD"] == first["MLFLOW_AUTH_ADMIN_PASSWORD"] != first["AWS_SECRET_ACCESS_KEY"]
    assert again["AWS_SECRET_ACCESS_KEY"] == "given"
    assert first["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert first["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert "cifar10-ci-only" not in first["MLFLOW_AUTH_DATABASE_URI"]  # libpq takes it from PGPASSWORD


def _sleeper(**marks: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env={**os.environ, **marks},
                            start_new_session=True)


def test_down_after_the_manager_died_stops_only_what_it_had_started(tmp_path):
    """No pid file: the processes a dead supervisord leaves carry its socket in their environment, which no
    unrelated process (another state's, or one that got a recycled pid) has."""
    run = tmp_path / "stack"
    mine = _sleeper(SUPERVISOR_SERVER_URL=f"unix://{run}/supervisor.sock", SUPERVISOR_GROUP_NAME="bento")
    airflow = _sleeper(SUPERVISOR_SERVER_URL=f"unix://{run}/supervisor.sock", SUPERVISOR_GROUP_NAME="airflow")
    other_state = _sleeper(SUPERVISOR_SERVER_URL=f"unix://{tmp_path}/other/supervisor.sock")
    unrelated = _sleeper()
    run.mkdir()
    (run / "supervisord.pid").write_text(str(unrelated.pid))  # what a reboot can leave: a pid now someone else's
    try:
        assert sweep(run, ["bento"]) == 1
        mine.wait(30)  # gone (reaped by the sweep's wait already, so no status of its own here)
        assert airflow.poll() is None
        assert sweep(run, []) == 1
        airflow.wait(30)
        assert other_state.poll() is None and unrelated.poll() is None
        assert sweep(run, []) == 0
    finally:
        for proc in (mine, airflow, other_state, unrelated):
            proc.kill()
            proc.wait()
