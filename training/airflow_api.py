"""A small client for Airflow 3's REST API (v2): what ``make pipeline`` needs to run the DAG.

It finds the DAG, unpauses it, triggers an ordinary manual run, and reads the run's task
instances and task logs, against the local stack's Airflow or a remote one:

    client = AirflowClient.from_env()      # AIRFLOW_API_URL, AIRFLOW_API_USER, AIRFLOW_API_PASSWORD
    run = client.trigger("cifar10_pipeline", {"recipe": "tiny"})

Authentication is Airflow's token endpoint (``POST /auth/token``, the simple auth manager's and
the FAB auth manager's alike); the token is fetched on first use and again once when it expires.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import quote

import requests

# Airflow's API server (simple auth manager) writes the generated admin password here, under AIRFLOW_HOME.
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"
# A run or task in one of these states will not change any more.
RUN_DONE = frozenset({"success", "failed"})
TASK_DONE = frozenset({"success", "failed", "skipped", "upstream_failed", "removed", "up_for_retry"})


class AirflowAPIError(RuntimeError):
    """Airflow could not be reached or refused a request; the message says what to do."""


def _segment(value: str) -> str:
    # Run ids hold ":" and "+" (manual__<ISO time>+00:00): quote every character.
    return quote(value, safe="")


class AirflowClient:
    """Airflow's REST API v2 at ``base_url`` (e.g. ``http://localhost:8080``)."""

    def __init__(self, base_url: str, username: str = "admin", password: str | None = None, *,
                 password_file: Path | None = None, token: str | None = None, timeout: float = 30.0,
                 session: Any = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.password = password
        self.password_file = password_file
        self.token = token
        self.timeout = timeout
        self.session = session if session is not None else requests.Session()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "AirflowClient":
        """The Airflow that the environment names.

        AIRFLOW_API_URL (default ``http://localhost:$AIRFLOW_PORT``, port 8080), AIRFLOW_API_USER
        (``admin``), and AIRFLOW_API_PASSWORD or AIRFLOW_API_TOKEN; without either, the password
        that the API server generated in ``$AIRFLOW_HOME``.
        """
        env = os.environ if environ is None else environ
        base_url = env.get("AIRFLOW_API_URL") or f"http://localhost:{env.get('AIRFLOW_PORT') or '8080'}"
        home = env.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
        return cls(base_url, env.get("AIRFLOW_API_USER") or "admin", env.get("AIRFLOW_API_PASSWORD") or None,
                   password_file=Path(home) / PASSWORDS_FILE, token=env.get("AIRFLOW_API_TOKEN") or None)

    # --- the endpoints ------------------------------------------------------

    def dag(self, dag_id: str) -> dict | None:
        """The DAG as Airflow knows it, or None while it has not been parsed (404)."""
        return self._call("GET", f"/api/v2/dags/{_segment(dag_id)}", missing_ok=True)

    def import_errors(self) -> list[dict]:
        """DAG files that failed to parse: ``[{"filename": ..., "stack_trace": ...}, ...]``."""
        return self._call("GET", "/api/v2/importErrors", params={"limit": 100})["import_errors"]

    def set_paused(self, dag_id: str, paused: bool) -> dict:
        return self._call("PATCH", f"/api/v2/dags/{_segment(dag_id)}", json={"is_paused": paused},
                          params={"update_mask": "is_paused"})

    def trigger(self, dag_id: str, conf: dict) -> dict:
        """Start an ordinary manual run now (run_type ``manual``, no logical date) with ``conf`` as params."""
        return self._call("POST", f"/api/v2/dags/{_segment(dag_id)}/dagRuns",
                          json={"logical_date": None, "conf": conf})

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        return self._call("GET", f"/api/v2/dags/{_segment(dag_id)}/dagRuns/{_segment(run_id)}")

    def set_run_state(self, dag_id: str, run_id: str, state: str) -> dict:
        """Mark a run ``failed`` (Airflow stops its running tasks), ``success`` or ``queued``."""
        return self._call("PATCH", f"/api/v2/dags/{_segment(dag_id)}/dagRuns/{_segment(run_id)}",
                          json={"state": state}, params={"update_mask": "state"})

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        path = f"/api/v2/dags/{_segment(dag_id)}/dagRuns/{_segment(run_id)}/taskInstances"
        return self._call("GET", path, params={"limit": 100})["task_instances"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int,
                 token: str | None = None) -> tuple[list, str | None]:
        """One try's log from where ``token`` left off: (entries, the token for the rest).

        Entries are dicts (``event``, ``timestamp``, ``level``, ``logger``, ...) or plain strings
        for lines Airflow could not parse; the token is None once the log is complete.
        """
        path = (f"/api/v2/dags/{_segment(dag_id)}/dagRuns/{_segment(run_id)}/taskInstances/"
                f"{_segment(task_id)}/logs/{try_number}")
        body = self._call("GET", path, params={"token": token} if token else None, missing_ok=True)
        if body is None:  # the try has no log yet
            return [], token
        return body.get("content") or [], body.get("continuation_token")

    def wait_for_dag(self, dag_id: str, timeout_s: float, poll_s: float = 2.0,
                     sleep: Callable[[float], None] = time.sleep,
                     clock: Callable[[], float] = time.monotonic) -> dict:
        """The DAG once Airflow has parsed it; raises with the import errors if it never appears."""
        deadline = clock() + timeout_s
        while True:
            if (dag := self.dag(dag_id)) is not None:
                return dag
            errors = self.import_errors()
            if errors or clock() >= deadline:
                break
            sleep(poll_s)
        if errors:
            details = "\n\n".join(f"{e.get('filename')}:\n{e.get('stack_trace', '').rstrip()}" for e in errors)
            raise AirflowAPIError(f"Airflow could not load DAG {dag_id!r}; its DAG processor reports these "
                                  f"import errors (fix the file, Airflow re-parses it by itself):\n\n{details}")
        raise AirflowAPIError(f"Airflow at {self.base_url} has no DAG {dag_id!r} after {timeout_s:.0f} s and no "
                              "import errors: check that its dags folder (AIRFLOW__CORE__DAGS_FOLDER) holds "
                              "the DAG file and that the DAG processor runs")

    def ui_url(self, dag_id: str, run_id: str, task_id: str | None = None) -> str:
        url = f"{self.base_url}/dags/{_segment(dag_id)}/runs/{_segment(run_id)}"
        return f"{url}/tasks/{_segment(task_id)}" if task_id else url

    # --- plumbing -----------------------------------------------------------

    def login(self) -> str:
        """A JWT for the user, from ``POST /auth/token``."""
        password = self.password
        if password is None:
            password = self._generated_password()
        response = self._send("POST", "/auth/token", json={"username": self.username, "password": password})
        if response.status_code not in (200, 201):
            raise AirflowAPIError(f"Airflow at {self.base_url} refused the login of user {self.username!r} "
                                  f"(HTTP {response.status_code}: {response.text[:200]}): set AIRFLOW_API_USER "
                                  "and AIRFLOW_API_PASSWORD (or AIRFLOW_API_TOKEN) to an account of that Airflow")
        self.token = response.json()["access_token"]
        return self.token

    def _generated_password(self) -> str:
        where = self.password_file
        try:
            passwords = json.loads(where.read_text()) if where else {}
        except (OSError, ValueError) as error:
            raise AirflowAPIError(f"no password for Airflow user {self.username!r}: AIRFLOW_API_PASSWORD is not "
                                  f"set and {where} cannot be read ({error}); set AIRFLOW_API_PASSWORD, or "
                                  "AIRFLOW_HOME to the home of the Airflow API server that wrote it") from None
        if self.username not in passwords:
            raise AirflowAPIError(f"{where} has no password for user {self.username!r} (users: "
                                  f"{', '.join(passwords) or 'none'}): set AIRFLOW_API_USER or AIRFLOW_API_PASSWORD")
        return passwords[self.username]

    def _send(self, method: str, path: str, **kwargs) -> Any:
        url = self.base_url + path
        try:
            return self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as error:
            raise AirflowAPIError(f"cannot reach Airflow at {self.base_url} ({type(error).__name__}: {error}); "
                                  "start it (make up, or make up PARTS=airflow) or set AIRFLOW_API_URL "
                                  "to where it runs") from None

    def _call(self, method: str, path: str, *, missing_ok: bool = False, **kwargs) -> Any:
        headers = {"Accept": "application/json"}
        for attempt in (1, 2):
            if self.token is None:
                self.login()
            response = self._send(method, path, headers={**headers, "Authorization": f"Bearer {self.token}"},
                                  **kwargs)
            if response.status_code != 401 or attempt == 2:
                break
            self.token = None  # expired or revoked: log in again, once
        if missing_ok and response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise AirflowAPIError(f"Airflow answered {method} {path} with HTTP {response.status_code}: "
                                  f"{response.text[:500]}")
        return response.json()
