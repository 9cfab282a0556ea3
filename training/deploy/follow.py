"""The served Bento follows the registry's ``champion`` alias, with no request dropped: blue/green on one host.

Two supervisord programs are the Bento's slots, ``bento:bento-blue`` on BENTO_PORT and ``bento:bento-green``
on the port after it, both on loopback; nginx (training/deploy/proxy.py) forwards to one of them. The
follower (``bento:follow``) polls the alias every CIFAR10_FOLLOW_INTERVAL seconds. When it names another
version than the one served, the follower takes that version's Bento (the lookup ``make serve`` uses), starts
it in the idle slot, waits for its /readyz, rewrites nginx's upstream and reloads nginx (SIGHUP: new workers
take new requests, the old ones finish theirs), waits for the old workers to exit, then stops the old slot.
A promotion by any run, ``make rollback`` and the rollback DAG are followed alike. A Bento that does not
become ready is stopped and the old one keeps serving; the same version is tried again after a back-off.

Where it stands is kept in STACK_RUN/serving.json (slot, Bento tag, version) and each slot's Bento tag in
STACK_RUN/bento-<slot>.tag, which the slot's program reads when supervisord starts it.

    python -m training.deploy.follow              # the follower (a supervisord program of `make up`)
    python -m training.deploy.follow slot blue    # a slot: `bentoml serve` of the tag in bento-blue.tag
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from training.deploy.slots import SLOTS, Served, assign, load, other, save, slot_port  # noqa: F401 (re-exported)

log = logging.getLogger("follow")

# Seconds between two looks at the alias. A look on the local SQLite store is one indexed query, a few
# milliseconds of CPU; the switch itself (a Bento's start until /readyz) takes far longer than this.
DEFAULT_INTERVAL_S = 5.0
# After a version's Bento failed to start, it is tried again only after this many seconds.
RETRY_AFTER_S = 300.0


def decide(served: Served, champion: str, failed: dict[str, float], now: float, pinned: str = "") -> str:
    """What one look at the registry leads to: ``stay``, ``wait`` (that version failed recently) or ``switch``.

    ``champion`` is the version the alias names ("" when none does: whatever is served keeps serving);
    ``pinned`` a Bento tag given by hand (BENTO_TAG), which is served instead of following the alias.
    """
    if pinned:
        return "stay" if served.tag == pinned else "wait" if now - failed.get(pinned, -RETRY_AFTER_S) < RETRY_AFTER_S \
            else "switch"
    if not champion or champion == served.version:
        return "stay"
    if now - failed.get(champion, -RETRY_AFTER_S) < RETRY_AFTER_S:
        return "wait"
    return "switch"


def serve_slot(slot: str) -> None:
    """A slot's program: exec ``bentoml serve`` of its assigned Bento on its loopback port (this process's pid,
    so supervisord stops the server itself)."""
    env = dict(os.environ)
    tag = (Path(env["STACK_RUN"]) / f"bento-{slot}.tag").read_text().strip()
    env["BENTOML_HOME"] = env.get("STACK_SERVING_HOME") or env["BENTOML_HOME"]
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    os.execve(bentoml, [bentoml, "serve", tag, "--host", "127.0.0.1", "--port", str(slot_port(env, slot))], env)


class Follower:
    """One look at a time (:meth:`step`); supervisord's RPC starts and stops the slots and signals nginx."""

    def __init__(self, env: dict[str, str], rpc=None) -> None:
        from training.deploy.stack import manager

        self.env, self.run = env, Path(env["STACK_RUN"])
        self.rpc = rpc or manager(self.run)
        self.failed: dict[str, float] = {}
        self.pinned = env.get("BENTO_TAG", "").strip()
        self._client = self._name = None

    # ------------------------------------------------------------- the registry

    def champion(self) -> str:
        """The version the alias names now ("" when none does or the registry does not answer)."""
        from training.registry.promotion import champion_version, client_for

        try:
            if self._client is None:
                from training.config import load_config

                config = load_config()
                self._client, self._name = client_for(config), config.registered_model_name
            return champion_version(self._client, self._name)
        except Exception as exc:  # an MLflow server restarting: the served Bento stays, the next look retries
            log.warning("the registry did not answer (%s): looking again later", exc)
            return ""

    def champion_tag(self) -> str | None:
        """The champion's Bento tag in the serving store (the distributed stack imports its archive first)."""
        if self.pinned:
            return self.pinned
        if self.env.get("STACK") == "distributed":
            from training.deploy.stack import _bento

            return _bento(self.env)
        from training.config import load_config
        from training.deploy.champion import NoChampion, champion_bento

        try:
            return champion_bento(load_config())
        except NoChampion as exc:
            log.warning("%s", exc)
            return None

    # ------------------------------------------------------------- supervisord and nginx

    def _state(self, program: str) -> str:
        try:
            return self.rpc.supervisor.getProcessInfo(program)["statename"]
        except Exception:
            return "UNKNOWN"

    def _stop(self, slot: str) -> None:
        if self._state(f"bento:bento-{slot}") in ("STARTING", "RUNNING", "BACKOFF"):
            self.rpc.supervisor.stopProcess(f"bento:bento-{slot}", True)

    def _ready(self, slot: str, limit: float) -> bool:
        from training.deploy.stack import _http

        ready, deadline = _http(f"http://127.0.0.1:{slot_port(self.env, slot)}/readyz"), time.monotonic() + limit
        while time.monotonic() < deadline:
            state = self._state(f"bento:bento-{slot}")
            if state not in ("STARTING", "RUNNING", "BACKOFF"):
                return False
            if state == "RUNNING" and ready():
                return True
            time.sleep(0.5)
        return False

    def _nginx_workers(self) -> set[int]:
        import psutil

        try:
            pid = self.rpc.supervisor.getProcessInfo("proxy:proxy")["pid"]
            return {child.pid for child in psutil.Process(pid).children()} if pid else set()
        except Exception:
            return set()

    def point_proxy(self, slot: str) -> bool:
        """Rewrite nginx's upstream to ``slot`` and reload it when it runs; wait until its old workers (which
        finish the requests they hold) have exited. Returns whether a running nginx was reloaded."""
        from training.deploy import proxy

        binary = proxy.nginx_binary(self.env.get("PATH")) or "nginx"

        def check(candidate: Path) -> None:
            done = subprocess.run([binary, "-t", "-q", "-c", str(candidate), "-e", "stderr",
                                   "-p", f"{self.run}/nginx/"], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"nginx refuses its new configuration: {done.stderr.strip()[-500:]}")

        proxy.write(self.env, slot_port(self.env, slot), check=check)
        if self._state("proxy:proxy") != "RUNNING":
            return False
        old = self._nginx_workers()
        self.rpc.supervisor.signalProcess("proxy:proxy", "HUP")
        deadline = time.monotonic() + proxy.UPSTREAM_READ_S + 10
        while old & self._nginx_workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        return True

    # ------------------------------------------------------------- the loop

    def reconcile(self) -> Served:
        """At start: nginx points at the recorded slot, and the other slot (a switch cut short) is stopped."""
        served = load(self.run)
        if served.slot:
            self.point_proxy(served.slot)
            self._stop(other(served.slot))
        return served

    def step(self, served: Served) -> Served:
        """One look at the alias, and the switch it calls for; returns what is served afterwards."""
        champion = "" if self.pinned else self.champion()
        if decide(served, champion, self.failed, time.monotonic(), self.pinned) != "switch":
            return served
        started = time.monotonic()
        tag = self.champion_tag()
        if not tag:
            self.failed[self.pinned or champion] = time.monotonic()
            return served
        if tag == served.tag and served.slot and self._state(f"bento:bento-{served.slot}") == "RUNNING":
            served = Served(served.slot, tag, champion)  # the alias moved to a version this Bento serves
            save(self.run, served)
            return served
        new = other(served.slot)
        log.info("champion is version %s (%s); starting it in slot %s beside %s", champion or "-", tag, new,
                 served.tag or "nothing")
        self._stop(new)
        assign(self.run, new, tag)
        self.rpc.supervisor.startProcess(f"bento:bento-{new}", False)
        if not self._ready(new, float(self.env.get("STACK_START_TIMEOUT", "600"))):
            log.error("%s did not become ready in slot %s (see %s/bento-%s.log); %s keeps serving", tag, new,
                      self.run, new, served.tag or "nothing")
            self._stop(new)
            self.failed[self.pinned or champion] = time.monotonic()
            return served
        ready = time.monotonic()
        try:
            reloaded = self.point_proxy(new)
        except Exception:  # nginx still has the old configuration, which points at the old slot
            log.exception("could not point nginx at slot %s; %s keeps serving", new, served.tag or "nothing")
            self._stop(new)
            self.failed[self.pinned or champion] = time.monotonic()
            return served
        save(self.run, after := Served(new, tag, champion))
        if served.slot:
            self._stop(served.slot)
        log.info("switched to %s in slot %s: ready after %.1f s, %s after %.1f s more; %s stopped", tag, new,
                 ready - started, "nginx reloaded and drained" if reloaded else "no nginx to reload",
                 time.monotonic() - ready, served.tag or "nothing")
        return after


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["slot"] and len(argv) == 2 and argv[1] in SLOTS:
        serve_slot(argv[1])
        return
    if argv:
        raise SystemExit(__doc__.rsplit("\n\n", 1)[-1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    interval = float(os.environ.get("CIFAR10_FOLLOW_INTERVAL", DEFAULT_INTERVAL_S))
    if interval <= 0:
        raise SystemExit(f"CIFAR10_FOLLOW_INTERVAL={interval:g}: must be a positive number of seconds")
    follower = Follower(dict(os.environ))
    served = follower.reconcile()
    log.info("following the champion every %g s; serving %s", interval, served.tag or "nothing yet")
    while True:
        served = follower.step(served)
        time.sleep(interval)


if __name__ == "__main__":
    main()
