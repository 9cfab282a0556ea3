"""Run a pipeline command and show its progress, not its log: ``make pipeline``'s console.

Everything the command prints (Airflow's per-task bookkeeping, library warnings,
TensorFlow's start-up lines, progress bars) goes to a log file; the console gets one
line per task start and end with its duration, the pipeline's own log lines (epochs,
the gate decision, the Bento tag), and for a failed task its error and the log's path.

    python -m training.console --log FILE -- airflow dags test cifar10_pipeline -c '{...}'
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Iterable

# `airflow dags test` marks each task's start and end; the state is in the line before the end.
TASK_START = re.compile(r"\[DAG TEST\] starting task_id=(\w+)")
TASK_END = re.compile(r"\[DAG TEST\] end task task_id=(\w+)")
TASK_STATE = re.compile(r"new_state=(\w+)")
# A line from the pipeline's own loggers or a task's print(): "<time> [info     ] message [training.x] key=value".
OWN_LINE = re.compile(r"^\S+ \[(\w+)\s*\] (.*?) \[(?:training(?:\.[\w.]+)?|task\.stdout)\](?: |$)")
# The exception at the end of a traceback: "pkg.module.SomeError: message".
EXCEPTION = re.compile(r"^([\w.]+(?:Error|Exception|Exit|Interrupt|Timeout)\w*): (.+)")


class Progress:
    """Turns the command's output lines into console lines (``feed`` returns what to print)."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.state: dict[str, str] = {}
        self.error: dict[str, str] = {}
        self.current: str | None = None
        self.failed: list[str] = []

    def feed(self, line: str, now: float) -> list[str]:
        out = []
        if m := TASK_START.search(line):
            self.current = task = m.group(1)
            self.started[task] = now
            self.state.pop(task, None)
            out.append(f"▶ {task}")
        elif m := TASK_END.search(line):
            task = m.group(1)
            state = self.state.get(task, "done")
            took = now - self.started.get(task, now)
            mark = {"success": "✓", "skipped": "–", "up_for_retry": "↻"}.get(state, "✗")
            text = f"{mark} {task} {state.replace('_', ' ')} in {took:.1f} s"
            if state not in ("success", "skipped") and task in self.error:
                text += f": {self.error[task]}"
            if state == "failed":
                self.failed.append(task)
            out.append(text)
            self.current = None
        elif self.current and (m := TASK_STATE.search(line)) and "Task instance state updated" in line:
            self.state[self.current] = m.group(1)
        elif m := OWN_LINE.match(line):
            level, message = m.groups()
            out.append(f"    {message}" if level == "info" else f"    {level}: {message}")
        elif self.current and (m := EXCEPTION.match(line.strip())):
            self.error[self.current] = f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)[:300]}"
        return out


def follow(lines: Iterable[str], log: IO[str], console: IO[str], clock=time.monotonic) -> Progress:
    """Copy ``lines`` to ``log`` and print their progress to ``console``."""
    progress = Progress()
    for line in lines:
        log.write(line)
        log.flush()
        for text in progress.feed(line.rstrip("\n"), clock()):
            console.write(f"{datetime.now():%H:%M:%S} {text}\n")
            console.flush()
    return progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, required=True, help="file that receives the command's whole output")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: python -m training.console --log FILE -- COMMAND ...")
    args.log.parent.mkdir(parents=True, exist_ok=True)
    print(f"Full log: {args.log}", flush=True)
    start = time.monotonic()
    with open(args.log, "w") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, bufsize=1, errors="replace") as proc:
        try:
            progress = follow(proc.stdout, log, sys.stdout)
        except KeyboardInterrupt:
            proc.terminate()
            raise
    took = time.monotonic() - start
    if proc.returncode:
        where = f"task {', '.join(progress.failed)}" if progress.failed else "the command"
        print(f"\n✗ pipeline failed in {took:.0f} s ({where}). Last lines of the log:\n", flush=True)
        print("".join(args.log.read_text(errors="replace").splitlines(keepends=True)[-25:]))
        print(f"The whole log: less {args.log}", flush=True)
    else:
        print(f"✓ pipeline finished in {took:.0f} s", flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
