"""The served Bento follows the registry's ``champion`` alias, with no request dropped: blue/green on one host.

Two supervisord programs are the Bento's slots, ``bento:bento-blue`` on BENTO_PORT and ``bento:bento-green``
on the port after it, both on loopback; the switch nginx behind the front door (training/deploy/proxy.py)
forwards to one of them. The follower (``bento:follow``) polls the alias every CIFAR10_FOLLOW_INTERVAL seconds.
When it names another version than the one served, the follower takes that version's Bento (the lookup
``make serve`` uses), starts it in the idle slot, waits for its /readyz, rewrites the switch's upstream and
reloads it (SIGHUP: new workers take new requests, the old ones finish theirs), waits for the old workers to
exit, then stops the old slot.
A promotion by any run, ``make rollback`` and the rollback DAG are followed alike. A Bento that does not
become ready is stopped and the old one keeps serving; the same version is tried again after a back-off.

Where a run names a version ``challenger`` instead (the promote step does so while this follower's heartbeat on
the registered model is fresh), that version's Bento starts in the idle slot and nginx mirrors a share of /predict
requests to it; the champion keeps answering every client. At the window's end the figures
(training/deploy/shadow.py) are logged to MLflow and exported on the follower's /metrics (FOLLOW_PORT, and
/shadow/metrics through the front door); ``champion`` moves only if they pass, and the switch above follows.

Where an MLflow tracking server runs, its registry webhook (signed with CIFAR10_WEBHOOK_SECRET) wakes the
follower as soon as an alias moves; it still polls, and polling is all there is on the local SQLite store.

Where it stands is kept in STACK_RUN/serving.json (slot, Bento tag, version) and each slot's Bento tag in
STACK_RUN/bento-<slot>.tag, which the slot's program reads when supervisord starts it.

    python -m training.deploy.follow              # the follower (a supervisord program of `make up`)
    python -m training.deploy.follow slot blue    # a slot: `bentoml serve` of the tag in bento-blue.tag
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
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

    def __init__(self, env: dict[str, str], rpc=None, interval: float = DEFAULT_INTERVAL_S, gauges=None) -> None:
        from training.deploy.stack import manager

        self.env, self.run, self.interval = env, Path(env["STACK_RUN"]), interval
        self.rpc = rpc or manager(self.run)
        self.failed: dict[str, float] = {}
        self.pinned = env.get("BENTO_TAG", "").strip()
        self.gauges = gauges
        self._client = self._name = self._config = None

    # ------------------------------------------------------------- the registry

    def config(self):
        """The pipeline's configuration, as this follower's environment gives it."""
        self._registry()
        return self._config

    def _registry(self):
        if self._client is None:
            from training.config import load_config
            from training.registry.promotion import client_for

            self._config = load_config()
            self._client, self._name = client_for(self._config), self._config.registered_model_name
        return self._client

    def champion(self) -> str:
        """The version the alias names now ("" when none does or the registry does not answer)."""
        from training.registry.promotion import champion_version

        try:
            return champion_version(self._registry(), self._name)
        except Exception as exc:  # an MLflow server restarting: the served Bento stays, the next look retries
            log.warning("the registry did not answer (%s): looking again later", exc)
            return ""

    def beat(self, stop: threading.Event) -> None:
        """Until ``stop``: every interval, the heartbeat that tells the promote step this front door shadows new
        versions (a thread of its own: a Bento's start or a shadow window takes far longer than the heartbeat
        stays fresh). It goes with the follower, so promotions move ``champion`` at once again."""
        from training.registry.promotion import FRONT_DOOR_TAG, front_door_beat

        while not stop.is_set():
            try:
                front_door_beat(self._registry(), self._name, self.interval, time.time())
            except Exception as exc:
                log.warning("could not leave the heartbeat on %s (%s): runs promote without a shadow", self._name, exc)
            stop.wait(self.interval)
        try:
            self._registry().delete_registered_model_tag(self._name, FRONT_DOOR_TAG)
        except Exception as exc:
            log.warning("could not remove the heartbeat from %s (%s): it goes stale by itself", self._name, exc)

    def challenger(self):
        """The model version ``challenger`` names while it waits for its shadow, or once its shadow passed but
        the promotion did not finish (a registry error mid-way); None otherwise."""
        from training.registry.promotion import SHADOWED, challenger

        try:
            mv = challenger(self._registry(), self._name)
        except Exception:
            return None
        if mv is None:
            return None
        return mv if mv.tags.get("gate_decision") == SHADOWED or mv.tags.get("shadow_decision") == "passed" else None

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
            pid = self.rpc.supervisor.getProcessInfo("proxy:switch")["pid"]
            return {child.pid for child in psutil.Process(pid).children()} if pid else set()
        except Exception:
            return set()

    def point_proxy(self, slot: str, shadow: str | None = None, share: float = 0.0) -> bool:
        """Rewrite the switch's upstream (training/deploy/proxy.py) to ``slot`` (mirroring ``share`` of /predict requests to slot ``shadow``) and
        reload it when it runs; wait until its old workers (which finish the requests they hold) have exited.
        Returns whether a running nginx was reloaded."""
        from training.deploy import proxy

        binary = proxy.nginx_binary(self.env.get("PATH")) or "nginx"

        def check(candidate: Path) -> None:
            done = subprocess.run([binary, "-t", "-q", "-c", str(candidate), "-e", "stderr",
                                   "-p", f"{self.run}/switch/"], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"nginx refuses its new configuration: {done.stderr.strip()[-500:]}")

        proxy.write(self.env, slot_port(self.env, slot), check=check,
                    shadow_port=slot_port(self.env, shadow) if shadow else None, share=share)
        if self._state("proxy:switch") != "RUNNING":
            return False
        old = self._nginx_workers()
        self.rpc.supervisor.signalProcess("proxy:switch", "HUP")
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
        """One look at the aliases, and the shadow or switch they call for; returns what is served afterwards."""
        champion = "" if self.pinned else self.champion()
        if champion and served.slot and champion == served.version:
            mv = self.challenger()
            if mv is not None and str(mv.version) != champion and \
                    time.monotonic() - self.failed.get(f"shadow {mv.version}", -RETRY_AFTER_S) >= RETRY_AFTER_S:
                if mv.tags.get("shadow_decision") != "passed":
                    return self.shadow(served, mv)
                self._finish(mv)  # its shadow passed: the move it began, then the switch below
                champion = self.champion()
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


    # ------------------------------------------------------------- shadow

    def _start(self, slot: str, tag: str) -> bool:
        self._stop(slot)
        assign(self.run, slot, tag)
        self.rpc.supervisor.startProcess(f"bento:bento-{slot}", False)
        return self._ready(slot, float(self.env.get("STACK_START_TIMEOUT", "600")))

    def challenger_tag(self, mv) -> str | None:
        """The challenger's Bento in the serving store (the distributed stack imports its published archive,
        sha256 checked); None while it is not published yet."""
        if self.env.get("STACK") == "distributed":
            done = subprocess.run([sys.executable, "-m", "training.packaging.bento_store", "import", "--alias",
                                   "challenger"], text=True, capture_output=True,
                                  env={**self.env, "BENTOML_HOME": self.env["STACK_SERVING_HOME"]})
            if done.returncode == 3:
                return None
            if done.returncode or not done.stdout.strip():
                raise RuntimeError(f"its Bento could not be imported: {done.stderr.strip()[-500:]}")
            return done.stdout.split()[-1]
        from training.deploy.champion import version_bento

        return version_bento(self._config, mv)

    def shadow(self, served: Served, mv) -> Served:
        """Shadow model version ``mv`` beside the champion in ``served``, judge it, and switch to it if it passed
        (its promotion moved ``champion``); returns what is served afterwards."""
        from training.deploy.champion import conclude_shadow
        from training.deploy.shadow import Figures, Thresholds, Window, judge
        from training.registry.promotion import challenger

        version, new = str(mv.version), other(served.slot)
        if mv.tags.get("shadow_champion") != served.version:
            self._conclude(version, False, f"it was named challenger beside version {mv.tags.get('shadow_champion')},"
                                           f" but version {served.version} is served: promote it again", {})
            return served
        try:
            thresholds = Thresholds.from_tags(mv.tags)
            tag = self.challenger_tag(mv)
        except Exception as exc:
            self._conclude(version, False, f"not shadowed: {exc}", {})
            return served
        if tag is None:
            self.failed[f"shadow {version}"] = time.monotonic() - RETRY_AFTER_S + 30  # look again in 30 s
            log.info("challenger version %s: waiting for its published Bento", version)
            return served
        log.info("challenger version %s (%s): starting it in slot %s beside the champion's %s", version, tag, new,
                 served.tag)
        if not self._start(new, tag):
            self._stop(new)
            self.failed[f"shadow {version}"] = time.monotonic()  # tried again after the back-off
            log.error("challenger version %s: its Bento %s did not become ready (see %s/bento-%s.log); trying again "
                      "in %.0f s", version, tag, self.run, new, RETRY_AFTER_S)
            return served
        window = Window.starting_now(self.run / "shadow.log")
        # The relay's socket (training/deploy/proxy.py): one left by an nginx that was killed would keep the new
        # configuration from loading, and no other shadow runs now.
        (self.run / "shadow.sock").unlink(missing_ok=True)
        try:
            self.point_proxy(served.slot, shadow=new, share=thresholds.share)
            log.info("mirroring %.0f%% of /predict requests to version %s until %d are answered or %g minutes pass",
                     100 * thresholds.share, version, thresholds.requests, thresholds.minutes)
            reason, deadline, looked = "", time.monotonic() + 60 * thresholds.minutes, time.monotonic()
            # The window counts judged requests (ones the champion answered 200), so answers to requests without
            # a token or with a broken image cannot end it early.
            while time.monotonic() < deadline:
                window.read()
                if Figures.of(window.pairs).requests >= thresholds.requests:
                    break
                self._export(version, Figures.of(window.pairs))
                if time.monotonic() - looked >= self.interval:
                    looked, now = time.monotonic(), self.champion()
                    try:
                        still = challenger(self._client, self._name)
                    except Exception:  # the registry not answering: look again at the next interval
                        still = mv
                    if now and now != served.version:
                        reason = f"the champion moved to version {now} during the shadow"
                    elif still is None or str(still.version) != version:
                        reason = "the challenger alias was moved or removed during the shadow"
                    if reason:
                        break
                time.sleep(0.5)
            figures = Figures.of(window.pairs)
            passed, why = (False, reason) if reason else judge(figures, thresholds)
            self._export(version, figures, passed)
            log.info("challenger version %s: %s", version, why)
            moved = conclude_shadow(self._config, version, passed, why, figures.as_dict())
        except Exception:
            log.exception("the shadow of version %s broke off; the champion's %s keeps serving", version, served.tag)
            self.failed[f"shadow {version}"] = time.monotonic()
            moved = False
        if not moved:
            self.point_proxy(served.slot)
            self._stop(new)
            return served
        self.point_proxy(new)
        save(self.run, after := Served(new, tag, version))
        self._stop(served.slot)
        log.info("switched to %s in slot %s after its shadow; %s stopped", tag, new, served.tag)
        return after

    def _conclude(self, version: str, passed: bool, why: str, figures: dict) -> bool:
        """:func:`conclude_shadow`, or (the registry not answering) a retry of the version after the back-off."""
        from training.deploy.champion import conclude_shadow

        try:
            return conclude_shadow(self._config, version, passed, why, figures)
        except Exception:
            log.exception("could not record the end of version %s's shadow; trying again later", version)
            self.failed[f"shadow {version}"] = time.monotonic()
            return False

    def _finish(self, mv) -> None:
        """A challenger whose shadow passed but whose promotion stopped part-way: finish it (each step of the
        move is idempotent), with the figures and reason recorded then."""
        log.info("challenger version %s passed its shadow; finishing its promotion", mv.version)
        self._conclude(str(mv.version), True, mv.tags.get("shadow_reason", "shadow passed"), {})

    def _export(self, version: str, figures, passed: bool | None = None) -> None:
        if self.gauges is not None:
            self.gauges.update(version, figures.as_dict(), passed)


class ShadowGauges:
    """The shadow's figures on the follower's /metrics: ``cifar10_shadow_<figure>{version}`` for each of
    :data:`training.deploy.shadow.FIGURES`, and ``cifar10_shadow_passed{version}`` (1 or 0) once judged."""

    def __init__(self, registry=None) -> None:
        import prometheus_client as prom
        from training.deploy.shadow import FIGURES

        self.registry = registry or prom.CollectorRegistry()
        self.figures = {name: prom.Gauge(f"cifar10_shadow_{name}", what, ["version"], registry=self.registry)
                        for name, what in FIGURES.items()}
        self.passed = prom.Gauge("cifar10_shadow_passed", "1: the challenger's shadow passed, 0: it failed",
                                 ["version"], registry=self.registry)

    def update(self, version: str, figures: dict, passed: bool | None) -> None:
        for name, value in figures.items():
            if value is not None:
                self.figures[name].labels(version).set(value)
        if passed is not None:
            self.passed.labels(version).set(int(passed))


# MLflow's registry webhook, where a tracking server runs: an alias set or removed wakes the follower at once
# (the look that follows reads the aliases; a delivery's payload is never trusted for what to serve).
WEBHOOK_NAME = "cifar10-front-door"
WEBHOOK_EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
# A delivery whose signed timestamp is further than this from now is refused (a replay could only wake us).
WEBHOOK_MAX_AGE_S = 300
WEBHOOK_MAX_BYTES = 1 << 20


def signed(secret: str, headers: dict[str, str], body: bytes, now: float) -> bool:
    """Whether an MLflow webhook delivery carries ``secret``'s HMAC-SHA256 signature (``v1,<base64>`` of
    ``<delivery id>.<timestamp>.<body>``) and a timestamp within :data:`WEBHOOK_MAX_AGE_S` of ``now``."""
    import base64
    import hashlib
    import hmac

    stamp, delivery = headers.get("X-MLflow-Timestamp", ""), headers.get("X-MLflow-Delivery-Id", "")
    try:
        fresh = abs(now - int(stamp)) <= WEBHOOK_MAX_AGE_S
    except ValueError:
        return False
    digest = hmac.new(secret.encode(), f"{delivery}.{stamp}.".encode() + body, hashlib.sha256).digest()
    expected = f"v1,{base64.b64encode(digest).decode()}"
    return fresh and hmac.compare_digest(headers.get("X-MLflow-Signature", "").encode(), expected.encode())


def serve(port: int, gauges: ShadowGauges, wake: threading.Event, token: str = "", secret: str = ""):
    """The follower's HTTP server on loopback ``port``, in a thread: ``GET /metrics`` (the shadow's figures; with
    ``token``, only to ``Authorization: Bearer token``) and, with ``secret``, ``POST /webhook`` for MLflow's
    signed deliveries, each of which sets ``wake``. Returns the server."""
    import hmac
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import prometheus_client as prom

    metrics = prom.make_wsgi_app(gauges.registry)

    def answer(start_response, status: str, extra=()) -> list[bytes]:
        start_response(status, [("Content-Length", "0"), *extra])
        return [b""]

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/webhook" and secret:
            if environ.get("REQUEST_METHOD") != "POST":
                return answer(start_response, "405 Method Not Allowed", [("Allow", "POST")])
            length = int(environ.get("CONTENT_LENGTH") or 0)
            if length > WEBHOOK_MAX_BYTES:
                return answer(start_response, "413 Content Too Large")
            body = environ["wsgi.input"].read(length)
            headers = {name: environ.get("HTTP_" + name.upper().replace("-", "_"), "")
                       for name in ("X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id")}
            if not signed(secret, headers, body, time.time()):
                return answer(start_response, "401 Unauthorized")
            wake.set()
            return answer(start_response, "204 No Content")
        given = environ.get("HTTP_AUTHORIZATION", "")
        if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return answer(start_response, "401 Unauthorized", [("WWW-Authenticate", "Bearer")])
        return metrics(environ, start_response)

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = make_server("127.0.0.1", port, app, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, name="follower-http", daemon=True).start()
    return server


def register_webhook(client, url: str, secret: str) -> None:
    """Have the MLflow tracking server behind ``client`` deliver alias events to ``url``, signed with ``secret``
    (the webhook named :data:`WEBHOOK_NAME` is created, or updated to these)."""
    found = [hook for hook in client.list_webhooks() if hook.name == WEBHOOK_NAME]
    if found:
        client.update_webhook(found[0].webhook_id, url=url, events=list(WEBHOOK_EVENTS), secret=secret,
                              status="ACTIVE")
    else:
        client.create_webhook(WEBHOOK_NAME, url, list(WEBHOOK_EVENTS), secret=secret,
                              description="The front door's follower: look at the aliases now")


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
    gauges, wake = ShadowGauges(), threading.Event()
    secret = os.environ.get("CIFAR10_WEBHOOK_SECRET", "")
    follower = Follower(dict(os.environ), interval=interval, gauges=gauges)
    if os.environ.get("FOLLOW_PORT"):
        port = int(os.environ["FOLLOW_PORT"])
        serve(port, gauges, wake, os.environ.get("CIFAR10_API_TOKEN", ""), secret)
        if secret and follower.config().tracking_uri.startswith(("http://", "https://")):
            try:
                register_webhook(follower._registry(), f"http://127.0.0.1:{port}/webhook", secret)
                log.info("MLflow delivers alias events to this follower; it also looks every %g s", interval)
            except Exception as exc:  # an MLflow without webhooks, or a login that may not create them
                log.warning("could not register the registry webhook (%s): looking every %g s only", exc, interval)
    stop = threading.Event()
    beat = threading.Thread(target=follower.beat, args=(stop,), name="heartbeat")
    beat.start()

    def leave(*_) -> None:  # supervisord stops the follower with SIGTERM: the heartbeat goes first
        stop.set()
        beat.join(30)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    served = follower.reconcile()
    log.info("following the champion every %g s; serving %s", interval, served.tag or "nothing yet")
    while True:
        served = follower.step(served)
        wake.wait(interval)  # a webhook delivery ends the wait early
        wake.clear()


if __name__ == "__main__":
    main()
