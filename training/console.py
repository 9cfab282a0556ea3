"""``make pipeline``'s console: the progress of a DAG run, not its log.

It triggers an ordinary run through Airflow's REST API and follows it: the scheduler runs the
tasks, and the console polls their states and reads their logs. Every log line goes to a file;
the console gets one line per task start and end with its duration, the pipeline's own log
lines (epochs, the gate decision, the Bento tag), and for a failed task its error, its log's
last lines and where the rest is.

    python -m training.console --log FILE --dag cifar10_pipeline --conf '{...}'
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import IO, Callable, Iterable

from training.airflow_api import RUN_DONE, TASK_DONE, AirflowAPIError, AirflowClient

# States of a task that has run (has a try and a log), and how its end reads on the console.
RAN = frozenset({"running", "success", "failed", "up_for_retry", "skipped"})
MARKS = {"success": "✓", "skipped": "–", "upstream_failed": "–", "removed": "–", "up_for_retry": "↻"}
# Terminal colour codes, and the bar Keras prints for predict()/fit() progress: a task's stdout
# carries both, and neither reads as a console line.
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PROGRESS_BAR = "━"
# Log lines of a failed task the console shows; the rest is in the log file.
TAIL_LINES = 25


def _stamp(console: IO[str], texts: Iterable[str]) -> None:
    for text in texts:
        console.write(f"{datetime.now():%H:%M:%S} {text}\n")
    console.flush()


def own_line(entry: dict) -> str | None:
    """The console line for a structured log entry of the pipeline's own loggers or a task's print()."""
    logger = str(entry.get("logger") or "")
    if not (logger == "training" or logger.startswith("training.") or logger == "task.stdout"):
        return None
    level, message = str(entry.get("level") or "info"), ANSI.sub("", str(entry.get("event", "")))
    if PROGRESS_BAR in message:
        return None
    return f"    {message}" if level == "info" else f"    {level}: {message}"


def error_summary(entry: dict) -> str | None:
    """``Type: message`` of the exception a "Task failed with exception" entry carries."""
    chain = entry.get("error_detail") or []
    if not chain:
        return None
    raised = chain[0]  # the chain starts with the exception that was raised, then what it handled
    value = str(raised.get("exc_value", "")).strip().splitlines()
    return f"{str(raised.get('exc_type', '')).rsplit('.', 1)[-1]}: {(value[0] if value else '')[:300]}"


def log_lines(entry: dict | str) -> list[str]:
    """An entry as text lines in the log file: ``<time> [level] event [logger]``, then any traceback."""
    if not isinstance(entry, dict):
        return [str(entry)]
    head = f"{entry.get('timestamp') or '':<27} [{entry.get('level') or '':<9}] {entry.get('event', '')}"
    if entry.get("logger"):
        head += f" [{entry['logger']}]"
    lines = head.splitlines() or [""]
    # Python's order: the first exception of a chain first, the one that was raised last.
    for n, error in enumerate(reversed(entry.get("error_detail") or [])):
        if n:
            lines += ["", "During handling of the above exception, another exception occurred:", ""]
        lines.append("Traceback (most recent call last):")
        lines += [f'  File "{f.get("filename")}", line {f.get("lineno")}, in {f.get("name")}'
                  for f in error.get("frames") or []]
        lines += f"{error.get('exc_type')}: {error.get('exc_value')}".splitlines()
    return lines


def _seconds(ti: dict) -> float | None:
    if ti.get("duration") is not None:
        return float(ti["duration"])
    try:
        return (datetime.fromisoformat(ti["end_date"]) - datetime.fromisoformat(ti["start_date"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


class Progress:
    """Turns snapshots of a run's task instances and their log entries into console lines.

    ``starts`` and ``ends`` are fed each task instance as the API returns it (``task_id``,
    ``state``, ``try_number``, ``duration``), ``entries`` the log entries of one of its tries
    in between, so that an end line carries the error its log reported; all return what to
    print. A task that started and ended between two snapshots still gets its start line,
    and a try that ended unseen (the next one is already running) its end line.
    """

    def __init__(self) -> None:
        self.shown: dict[str, tuple[int, str]] = {}  # task -> (try, "running" or the end state shown)
        self.error: dict[tuple[str, int], str] = {}
        self.tail: dict[tuple[str, int], deque[str]] = {}
        self.failed: list[str] = []

    def entries(self, task: str, try_number: int, entries: Iterable[dict | str]) -> tuple[list[str], list[str]]:
        """(console lines, log-file lines) for new log entries of one try."""
        out, written = [], []
        tail = self.tail.setdefault((task, try_number), deque(maxlen=TAIL_LINES))
        # Tasks that run side by side interleave their lines: then each line names its task.
        side_by_side = sum(state == "running" for _, state in self.shown.values()) > 1
        for entry in entries:
            lines = log_lines(entry)
            written += [f"{task} #{try_number} {line}" for line in lines]
            tail.extend(line[:300] for line in lines)
            if isinstance(entry, dict):
                if (text := own_line(entry)) is not None:
                    out.append(f"    [{task}] {text.lstrip()}" if side_by_side else text)
                if (summary := error_summary(entry)) is not None:
                    self.error[(task, try_number)] = summary
        return out, written

    def starts(self, ti: dict) -> list[str]:
        """Console lines for a try that began since the last snapshot (and an earlier try that ended unseen)."""
        task, state, tried = ti["task_id"], ti.get("state"), int(ti.get("try_number") or 0)
        seen_try, seen_state = self.shown.get(task, (0, ""))
        out = []
        if seen_try and tried > seen_try and seen_state == "running":
            out.append(self._end(task, seen_try, "up_for_retry", None))
        if tried > 0 and state in RAN and tried != seen_try:
            out.append(f"▶ {task}" + (f" (try {tried})" if tried > 1 else ""))
            self.shown[task] = (tried, "running")
        return out

    def ends(self, ti: dict) -> list[str]:
        """The console line for a try that ended since the last snapshot (after its log was read)."""
        task, state, tried = ti["task_id"], ti.get("state"), int(ti.get("try_number") or 0)
        if state not in TASK_DONE or self.shown.get(task) == (tried, state):
            return []
        self.shown[task] = (tried, state)
        return [self._end(task, tried, state, _seconds(ti) if tried > 0 and state in RAN else None)]

    def _end(self, task: str, tried: int, state: str, seconds: float | None) -> str:
        text = f"{MARKS.get(state, '✗')} {task} {state.replace('_', ' ')}"
        if seconds is not None:
            text += f" in {seconds:.1f} s"
        if state not in ("success", "skipped") and (task, tried) in self.error:
            text += f": {self.error[(task, tried)]}"
        if state == "failed":
            self.failed.append(task)
        return text


def follow_run(client, dag_id: str, run_id: str, log: IO[str], console: IO[str], poll_s: float = 2.0,
               sleep: Callable[[float], None] = time.sleep, patience: int = 30) -> tuple[dict, Progress]:
    """Follow a DAG run until it ends: task lines and own log lines to ``console``, every log line to ``log``.

    Returns the run's last state from the API and the progress (failed tasks, their log tails).
    Up to ``patience`` looks in a row may fail (an API server that a busy machine slows past
    the client's timeout) before the error is raised; a failed look is simply taken again.
    """
    progress = Progress()
    tokens: dict[tuple[str, int], str | None] = {}
    complete: set[tuple[str, int]] = set()
    # Airflow's continuation token does not always hold across a try's end (seen: the log read
    # again from its start once the running task's served log became a finished file), so
    # entries already shown are recognised by their content.
    seen: dict[tuple[str, int], set[str]] = {}

    def fresh(key: tuple[str, int], entries: list) -> list:
        known = seen.setdefault(key, set())
        new = []
        for entry in entries:
            mark = json.dumps(entry, sort_keys=True, default=str)
            if mark not in known:
                known.add(mark)
                new.append(entry)
        return new

    def read(ti: dict, tried: int, done: bool) -> list[str]:
        key = (ti["task_id"], tried)
        out = []
        while key not in complete:
            entries, token = client.task_log(dag_id, run_id, ti["task_id"], tried, tokens.get(key))
            texts, written = progress.entries(ti["task_id"], tried, fresh(key, entries))
            out += texts
            log.writelines(line + "\n" for line in written)
            tokens[key] = token
            if token is None and done:
                complete.add(key)
            # A running try has nothing more for now; a finished one is read to its end.
            if not done or not entries:
                break
        log.flush()
        return out

    def look() -> dict:
        run = client.dag_run(dag_id, run_id)  # before the tasks, so a run seen ended has its tasks ended too
        for ti in sorted(client.task_instances(dag_id, run_id), key=lambda t: (t.get("start_date") or "~",
                                                                                t["task_id"])):
            tried, state = int(ti.get("try_number") or 0), ti.get("state")
            lines = []
            seen_try = progress.shown.get(ti["task_id"], (0, ""))[0]
            for earlier in range(max(seen_try, 1), tried):  # tries that ended between two snapshots
                lines += read(ti, earlier, done=True)
            lines += progress.starts(ti)
            if tried and state in RAN:
                lines += read(ti, tried, done=state in TASK_DONE)
            lines += progress.ends(ti)
            _stamp(console, lines)
        return run

    misses = 0
    while True:
        try:
            run = look()
            misses = 0
        except AirflowAPIError:
            misses += 1
            if misses >= patience:
                raise
        else:
            if run.get("state") in RUN_DONE:
                return run, progress
        sleep(poll_s)


def _trigger_and_follow(args: argparse.Namespace) -> int:
    client = AirflowClient.from_env()
    start = time.monotonic()
    try:
        conf = json.loads(args.conf)
    except ValueError as error:
        print(f"✗ --conf is not JSON ({error}): {args.conf!r}", flush=True)
        return 2
    try:
        dag = client.wait_for_dag(args.dag, args.dag_timeout)
        if dag.get("is_paused"):
            # Airflow's scheduler starts no run of a paused DAG, a manual one included.
            client.set_paused(args.dag, False)
            print(f"DAG {args.dag} was paused: unpaused it so that the scheduler runs this run (it stays "
                  "unpaused, so its schedule, if any, is active too)", flush=True)
        run = client.trigger(args.dag, conf)
    except AirflowAPIError as error:
        print(f"✗ pipeline not started: {error}", flush=True)
        return 1
    run_id = run["dag_run_id"]
    print(f"Run {run_id} ({run.get('run_type')}) in Airflow: {client.ui_url(args.dag, run_id)}", flush=True)
    with open(args.log, "w") as log:
        try:
            run, progress = follow_run(client, args.dag, run_id, log, sys.stdout, poll_s=args.poll)
        except KeyboardInterrupt:
            # The scheduler would carry on with a run nobody watches; stop it instead.
            print(f"\nInterrupted: marking run {run_id} failed in Airflow, which stops its running task.",
                  flush=True)
            try:
                client.set_run_state(args.dag, run_id, "failed")
            except AirflowAPIError as error:
                print(f"  could not ({error}); stop it in the UI: {client.ui_url(args.dag, run_id)}", flush=True)
            return 130
        except AirflowAPIError as error:
            print(f"\n✗ lost track of run {run_id}: {error}\n  It may still run: {client.ui_url(args.dag, run_id)}",
                  flush=True)
            return 1
    took = time.monotonic() - start
    if run.get("state") == "success":
        print(f"✓ pipeline finished in {took:.0f} s", flush=True)
        return 0
    where = f"task {', '.join(progress.failed)}" if progress.failed else f"run state {run.get('state')}"
    print(f"\n✗ pipeline failed in {took:.0f} s ({where}).", flush=True)
    for task in progress.failed:
        tried = max((t for (name, t) in progress.tail if name == task), default=0)
        if tried:
            print(f"Last lines of {task}'s log (try {tried}):\n", flush=True)
            print("\n".join(progress.tail[(task, tried)]), flush=True)
        print(f"\nThe whole log: less {args.log}   (grep '^{task} #{tried} ' for this try)\n"
              f"In Airflow: {client.ui_url(args.dag, run_id, task)}", flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, required=True, help="file that receives the whole output")
    parser.add_argument("--dag", required=True, help="trigger this DAG through Airflow's REST API (AIRFLOW_API_URL, "
                                                     "AIRFLOW_API_USER, AIRFLOW_API_PASSWORD) and follow the run")
    parser.add_argument("--conf", default="{}", help="the run's params as JSON")
    parser.add_argument("--dag-timeout", type=float, default=300.0, help="seconds to wait for Airflow to parse the DAG")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between looks at the run")
    args = parser.parse_args(argv)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    print(f"Full log: {args.log}", flush=True)
    return _trigger_and_follow(args)


if __name__ == "__main__":
    sys.exit(main())
