"""``make pipeline``'s console: a run followed through Airflow's REST API."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def test_without_a_dag_it_is_a_usage_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "training.console", "--log", str(tmp_path / "x.log")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "--dag" in out.stderr


# --- following a run the scheduler executes (make pipeline) -------------------------------------------

RUN = "manual__2026-12-02T13:57:42.258412+00:00"
SOURCE = [{"event": "::group::Log message source details"},
          {"event": "/state/airflow/logs/dag_id=cifar10_pipeline/run_id=x/task_id=train/attempt=1.log"},
          {"event": "::endgroup::"}]


def _entry(event: str, logger: str, level: str = "info", **extra) -> dict:
    return {"timestamp": "2026-12-02T13:52:45.616958Z", "event": event, "level": level, "logger": logger,
            "task_id": "train", "try_number": 1, "filename": "fit.py", "lineno": 148, **extra}


EPOCH = _entry("epoch 1/2 7.3s accuracy=0.2292 val_accuracy=0.4000", "training.model.fit")
STDERR = {"timestamp": "2026-12-02T13:52:19.595599Z", "level": "error", "logger": "task.stderr",
          "event": "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"}
# Airflow's record of a task's exception: the raised one first, then the one it was handling.
FAILED = _entry("Task failed with exception", "task", "error", error_detail=[
    {"exc_type": "TypeError", "exc_value": "Functional could not be deserialized properly.\n\nconfig={...}",
     "is_cause": False, "frames": [{"filename": "/work/main/training/packaging/bento.py", "lineno": 94,
                                    "name": "import_champion"}]},
    {"exc_type": "TypeError", "exc_value": "Could not locate function 'cifar10>gelu_tanh'.", "is_cause": False,
     "frames": [{"filename": "keras/src/saving/serialization_lib.py", "lineno": 899, "name": "_retrieve"}]}])


ORDER = {"fetch": 1, "train": 2, "build": 3}


def _ti(task: str, state: str | None, tried: int, duration: float | None = None) -> dict:
    start = None if state is None else f"2026-12-02T13:5{ORDER[task]}:00Z"
    return {"task_id": task, "state": state, "try_number": tried, "duration": duration, "start_date": start,
            "end_date": None, "dag_run_id": RUN, "map_index": -1}


class FakeClient:
    """Airflow as the console sees it: one snapshot of the run per poll, each try's log in chunks."""

    base_url = "http://localhost:8080"

    def __init__(self, snapshots, logs):
        self.snapshots, self.logs, self.polls = list(snapshots), logs, 0
        self.log_calls: list[tuple[str, int, str | None]] = []

    def dag_run(self, dag_id, run_id):
        self.polls += 1
        return {"dag_run_id": run_id, "state": self.snapshots[min(self.polls, len(self.snapshots)) - 1][0]}

    def task_instances(self, dag_id, run_id):
        return self.snapshots[min(self.polls, len(self.snapshots)) - 1][1]

    def task_log(self, dag_id, run_id, task_id, try_number, token=None):
        self.log_calls.append((task_id, try_number, token))
        chunks = self.logs.get((task_id, try_number), [])
        n = int(token or 0)
        if n >= len(chunks):
            return [], (None if self._done(task_id, try_number) else token)
        return chunks[n], str(n + 1)

    def _done(self, task_id, try_number):
        ti = {t["task_id"]: t for t in self.task_instances("", "")}[task_id]
        return ti["try_number"] > try_number or ti["state"] not in ("running", None)

    def ui_url(self, dag_id, run_id, task_id=None):
        return f"{self.base_url}/dags/{dag_id}/runs/{run_id}" + (f"/tasks/{task_id}" if task_id else "")


SNAPSHOTS = [
    ("running", [_ti("fetch", "running", 1), _ti("train", None, 0), _ti("build", None, 0)]),
    ("running", [_ti("fetch", "success", 1, 1.1), _ti("train", "running", 1), _ti("build", None, 0)]),
    ("running", [_ti("fetch", "success", 1, 1.1), _ti("train", "up_for_retry", 1, 30.2), _ti("build", None, 0)]),
    ("failed", [_ti("fetch", "success", 1, 1.1), _ti("train", "failed", 2, 12.5),
                _ti("build", "upstream_failed", 0, 0.0)]),
]
LOGS = {("fetch", 1): [[*SOURCE, _entry("fetched file:///mini.zip", "training.data.fetch")]],
        ("train", 1): [[STDERR, EPOCH], [FAILED]],
        ("train", 2): [[_entry("printed by the task", "task.stdout"), FAILED]]}


def _follow(snapshots=SNAPSHOTS, logs=LOGS):
    from training.console import follow_run

    log, console = io.StringIO(), io.StringIO()
    client = FakeClient(snapshots, logs)
    run, progress = follow_run(client, "cifar10_pipeline", RUN, log, console, poll_s=0, sleep=lambda s: None)
    return run, progress, [line.split(" ", 1)[1] for line in console.getvalue().splitlines()], log.getvalue()


def test_following_a_run_shows_each_try_its_own_lines_and_the_error():
    run, progress, console, _ = _follow()
    assert run["state"] == "failed"
    assert console == [
        "▶ fetch",
        "    fetched file:///mini.zip",
        "✓ fetch success in 1.1 s",
        "▶ train",
        "    epoch 1/2 7.3s accuracy=0.2292 val_accuracy=0.4000",
        "↻ train up for retry in 30.2 s: TypeError: Functional could not be deserialized properly.",
        "▶ train (try 2)",
        "    printed by the task",
        "✗ train failed in 12.5 s: TypeError: Functional could not be deserialized properly.",
        "– build upstream failed",
    ]
    assert progress.failed == ["train"]


def test_the_log_file_gets_every_line_of_every_try_with_tracebacks_in_pythons_order():
    _, progress, _, log = _follow()
    lines = log.splitlines()
    assert "absl::InitializeLog" in log and "Log message source details" in log
    assert all(line.startswith(("fetch #1 ", "train #1 ", "train #2 ")) for line in lines)
    try2 = [line.split(" ", 2)[2] for line in lines if line.startswith("train #2 ")]
    traceback = try2[-11:]
    assert "Task failed with exception" in try2[-12] and traceback[0] == "Traceback (most recent call last):"
    assert "TypeError: Could not locate function 'cifar10>gelu_tanh'." in traceback
    assert "During handling of the above exception, another exception occurred:" in traceback
    assert traceback[-3:] == ["TypeError: Functional could not be deserialized properly.", "", "config={...}"]
    assert list(progress.tail[("train", 2)])[-1] == "config={...}"


def test_a_task_that_ran_between_two_looks_still_gets_its_start_log_and_end():
    snapshots = [("running", [_ti("fetch", None, 0)]), ("success", [_ti("fetch", "success", 1, 0.4)])]
    _, progress, console, _ = _follow(snapshots, {("fetch", 1): [[_entry("cache hit", "training.data.fetch")]]})
    assert console == ["▶ fetch", "    cache hit", "✓ fetch success in 0.4 s"]
    assert progress.failed == []


def test_a_try_that_ended_unseen_is_read_to_its_end_and_shown_as_retried():
    snapshots = [("running", [_ti("train", "running", 1)]), ("success", [_ti("train", "success", 2, 3.0)])]
    logs = {("train", 1): [[EPOCH], [FAILED]], ("train", 2): [[_entry("epoch 1/2 again", "training.model.fit")]]}
    _, progress, console, log = _follow(snapshots, logs)
    assert console == ["▶ train", "    epoch 1/2 7.3s accuracy=0.2292 val_accuracy=0.4000",
                       "↻ train up for retry: TypeError: Functional could not be deserialized properly.",
                       "▶ train (try 2)", "    epoch 1/2 again", "✓ train success in 3.0 s"]
    assert "train #1 Traceback (most recent call last):" in log


def test_a_failed_run_prints_the_tasks_log_tail_the_whole_log_and_the_ui(tmp_path, monkeypatch, capsys):
    import training.console as console_module

    client = FakeClient(SNAPSHOTS, LOGS)
    client.wait_for_dag = lambda dag_id, timeout_s: {"dag_id": dag_id, "is_paused": True}
    calls = []
    client.set_paused = lambda dag_id, paused: calls.append(("paused", paused))
    client.trigger = lambda dag_id, conf: calls.append(("trigger", conf)) or {"dag_run_id": RUN, "run_type": "manual"}
    monkeypatch.setattr(console_module.AirflowClient, "from_env", classmethod(lambda cls: client))
    log = tmp_path / "logs" / "run.log"
    code = console_module.main(["--log", str(log), "--dag", "cifar10_pipeline", "--conf", '{"recipe": "tiny"}',
                                "--poll", "0"])
    out = capsys.readouterr().out
    assert code == 1
    assert calls == [("paused", False), ("trigger", {"recipe": "tiny"})]
    assert "was paused: unpaused it" in out
    assert "✗ pipeline failed" in out and "(task train)" in out and "✓ pipeline finished" not in out
    tail = out.split("Last lines of train's log (try 2):", 1)[1]
    assert "TypeError: Could not locate function 'cifar10>gelu_tanh'." in tail
    assert f"less {log}" in tail and "grep '^train #2 '" in tail
    assert f"http://localhost:8080/dags/cifar10_pipeline/runs/{RUN}/tasks/train" in tail
    assert "train #2 " in log.read_text()


def test_a_successful_run_ends_with_the_line_ci_looks_for(tmp_path, monkeypatch, capsys):
    import training.console as console_module

    client = FakeClient([("success", [_ti("fetch", "success", 1, 0.4)])], {("fetch", 1): [[]]})
    client.wait_for_dag = lambda dag_id, timeout_s: {"dag_id": dag_id, "is_paused": False}
    client.trigger = lambda dag_id, conf: {"dag_run_id": RUN, "run_type": "manual"}
    monkeypatch.setattr(console_module.AirflowClient, "from_env", classmethod(lambda cls: client))
    assert console_module.main(["--log", str(tmp_path / "run.log"), "--dag", "cifar10_pipeline"]) == 0
    out = capsys.readouterr().out
    assert "✓ pipeline finished in" in out and "unpaused" not in out


def test_kerass_progress_bars_on_stdout_stay_in_the_log_only():
    from training.console import Progress

    bar = "\x1b[1m1/1\x1b[0m \x1b[32m━━━━━━━━━━━━━━━━━━━━\x1b[0m\x1b[37m\x1b[0m \x1b[1m0s\x1b[0m 9s/step"
    console, written = Progress().entries("train", 1, [_entry(bar, "task.stdout"),
                                                          _entry("\x1b[1mdone\x1b[0m", "task.stdout")])
    assert console == ["    done"]
    assert len(written) == 2 and "9s/step" in written[0]


def test_a_few_failed_looks_are_taken_again_and_too_many_raise():
    from training.airflow_api import AirflowAPIError
    from training.console import follow_run

    class Flaky(FakeClient):
        def __init__(self, failures):
            super().__init__([("success", [_ti("fetch", "success", 1, 0.4)])], {("fetch", 1): [[]]})
            self.failures = failures

        def dag_run(self, dag_id, run_id):
            if self.failures:
                self.failures -= 1
                raise AirflowAPIError("cannot reach Airflow (ReadTimeout)")
            return super().dag_run(dag_id, run_id)

    run, _ = follow_run(Flaky(2), "cifar10_pipeline", RUN, io.StringIO(), io.StringIO(), sleep=lambda s: None,
                        patience=3)
    assert run["state"] == "success"
    with pytest.raises(AirflowAPIError, match="ReadTimeout"):
        follow_run(Flaky(3), "cifar10_pipeline", RUN, io.StringIO(), io.StringIO(), sleep=lambda s: None,
                   patience=3)


def test_ctrl_c_marks_the_run_failed_in_airflow(tmp_path, monkeypatch, capsys):
    import training.console as console_module

    class Interrupted(FakeClient):
        def dag_run(self, dag_id, run_id):
            raise KeyboardInterrupt

    client = Interrupted(SNAPSHOTS, LOGS)
    client.wait_for_dag = lambda dag_id, timeout_s: {"dag_id": dag_id, "is_paused": False}
    client.trigger = lambda dag_id, conf: {"dag_run_id": RUN, "run_type": "manual"}
    marked = []
    client.set_run_state = lambda dag_id, run_id, state: marked.append((run_id, state))
    monkeypatch.setattr(console_module.AirflowClient, "from_env", classmethod(lambda cls: client))
    assert console_module.main(["--log", str(tmp_path / "run.log"), "--dag", "cifar10_pipeline"]) == 130
    assert marked == [(RUN, "failed")]
    assert f"marking run {RUN} failed in Airflow" in capsys.readouterr().out


def test_lines_of_tasks_that_run_side_by_side_name_their_task():
    from training.console import Progress

    progress = Progress()
    progress.starts(_ti("build", "running", 1))
    assert progress.entries("build", 1, [_entry("built Bento x", "training.packaging.bento")])[0] == [
        "    built Bento x"]
    progress.starts(_ti("fetch", "running", 1))
    assert progress.entries("build", 1, [_entry("skipping containerize", "training.packaging.container",
                                                "warning")])[0] == ["    [build] warning: skipping containerize"]


def test_a_log_that_airflow_serves_again_from_its_start_is_shown_once():
    built = _entry("built Bento cifar10-classifier:x", "training.packaging.bento")
    snapshots = [("running", [_ti("build", "running", 1)]), ("success", [_ti("build", "success", 1, 12.6)])]
    logs = {("build", 1): [[*SOURCE, built], [*SOURCE, built, _entry("after", "training.packaging.bento")]]}
    _, _, console, log = _follow(snapshots, logs)
    assert console == ["▶ build", "    built Bento cifar10-classifier:x", "    after", "✓ build success in 12.6 s"]
    assert log.count("built Bento") == 1
