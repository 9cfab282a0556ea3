"""``make pipeline``'s console: progress lines from Airflow's output, the whole output in the log."""

from __future__ import annotations

import io
import subprocess
import sys

from training.console import Progress, follow

from tests.helpers import ROOT


# Lines as `airflow dags test` prints them (shortened where they run long).
T = "2026-12-01T20:19:48.157771Z"
LINES = [
    f"{T} [info     ] Filling up the DagBag from /work/main/dags [airflow.dag_processing.dagbag.BundleDagBag] loc=x",
    f"{T} [info     ] [DAG TEST] starting task_id=train map_index=-1 [airflow.sdk.definitions.dag] loc=dag.py:1501",
    f"{T} [info     ] Task instance state updated    [airflow.api_fastapi.execution_api.routes.task_instances] "
    "loc=task_instances.py:254 rows_affected=1",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    f"{T} [info     ] epoch 1/2: 120/547 batches (22%), 30 s [training.model.train] loc=train.py:160",
    f"{T} [info     ] epoch 1/2 6.5s accuracy=0.2292 val_accuracy=0.4000 [training.model.train] loc=train.py:148",
    f"{T} [info     ] Task instance state updated    [airflow.api_fastapi.execution_api.routes.task_instances] "
    "loc=task_instances.py:485 new_state=success rows_affected=1",
    f"{T} [info     ] [DAG TEST] end task task_id=train map_index=-1 [airflow.sdk.definitions.dag] loc=dag.py:1563",
    f"{T} [info     ] [DAG TEST] starting task_id=build map_index=-1 [airflow.sdk.definitions.dag] loc=dag.py:1501",
    "Traceback (most recent call last):",
    '  File "/work/main/training/packaging/bento.py", line 96, in build_bento',
    "bentoml.exceptions.BentoMLException: Failed to lock PyPI packages: uv pip compile failed",
    f"{T} [info     ] Task instance state updated    [airflow.api_fastapi.execution_api.routes.task_instances] "
    "loc=task_instances.py:485 new_state=failed rows_affected=1",
    f"{T} [info     ] [DAG TEST] end task task_id=build map_index=-1 [airflow.sdk.definitions.dag] loc=dag.py:1563",
]


def _console(lines: list[str]) -> list[str]:
    progress, clock = Progress(), iter(range(0, 1000, 5))
    return [text for line in lines for text in progress.feed(line, next(clock))]


def test_console_shows_tasks_with_durations_and_the_pipelines_own_lines_only():
    assert _console(LINES) == [
        "▶ train",
        "    epoch 1/2: 120/547 batches (22%), 30 s",
        "    epoch 1/2 6.5s accuracy=0.2292 val_accuracy=0.4000",
        "✓ train success in 30.0 s",
        "▶ build",
        "✗ build failed in 25.0 s: BentoMLException: Failed to lock PyPI packages: uv pip compile failed",
    ]


def test_warnings_of_the_pipeline_keep_their_level():
    line = f"{T} [warning  ] skipping containerize: no container builder [training.packaging.container] loc=container.py:182"
    assert _console([line]) == ["    warning: skipping containerize: no container builder"]


def test_a_retried_task_says_so_and_is_not_counted_as_failed():
    progress = Progress()
    lines = [LINES[8], LINES[11], LINES[12].replace("new_state=failed", "new_state=up_for_retry"), LINES[13]]
    out = [text for line in lines for text in progress.feed(line, 0.0)]
    assert out[-1].startswith("↻ build up for retry in 0.0 s: BentoMLException")
    assert progress.failed == []


def test_follow_writes_every_line_to_the_log():
    log, console = io.StringIO(), io.StringIO()
    follow([line + "\n" for line in LINES], log, console)
    assert log.getvalue().splitlines() == LINES
    assert "absl" not in console.getvalue() and "DagBag" not in console.getvalue()
    assert console.getvalue().count("\n") == 6


def test_a_failing_command_prints_its_log_tail_and_where_the_log_is(tmp_path):
    log = tmp_path / "logs" / "run.log"
    code = "import sys; print('line one'); print('the real reason'); sys.exit(3)"
    out = subprocess.run([sys.executable, "-m", "training.console", "--log", str(log), "--", sys.executable, "-c",
                          code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 3
    assert "pipeline failed" in out.stdout and "the real reason" in out.stdout
    assert f"less {log}" in out.stdout
    assert log.read_text() == "line one\nthe real reason\n"


def test_no_command_is_a_usage_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "training.console", "--log", str(tmp_path / "x.log")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "no command given" in out.stderr
