"""Requests a reload of the front door drops: one nginx that clients reach and that reloads, against the stacks'
front with the switch behind it (training/deploy/proxy.py), which is what reloads there, without and with the
shadow's mirror of half the /predict requests to a challenger 3x as slow.

A threaded Python upstream that answers each POST after ``--delay`` seconds stands in for the Bento; 8 clients
(``requests`` sessions, kept alive, no retries) post for ``--duration`` seconds while the reloaded nginx gets a
SIGHUP every ``--every`` seconds. Both setups run in one sitting.

    .venv/bin/python -m bench.reload_race [--duration 20] [--every 0.5] [--delay 0.01]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from training.deploy import proxy
from training.packaging.server import free_port


def upstream(delay: float) -> ThreadingHTTPServer:
    class Answer(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(delay)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args) -> None:
            pass

    class Quiet(ThreadingHTTPServer):
        def handle_error(self, request, client_address) -> None:
            pass  # nginx closing a connection it gave up on (a reload's old worker) is expected here

    server = Quiet(("127.0.0.1", free_port()), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def nginx(conf: Path, prefix: Path, pid: Path, log: Path) -> subprocess.Popen:
    process = subprocess.Popen([proxy.nginx_binary(), "-c", str(conf), "-e", "stderr", "-p", f"{prefix}/"],
                               stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 30
    while not pid.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return process


def load(url: str, seconds: float, reloaded: Path, every: float) -> tuple[int, int]:
    stop, counts, lock = time.monotonic() + seconds, [0, 0], threading.Lock()

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < stop:
            try:
                ok = session.post(url, files={"file": ("a.png", b"x" * 2000)}, timeout=10).status_code == 200
            except requests.RequestException:
                ok = False
            with lock:
                counts[0] += 1
                counts[1] += not ok

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    reloads = 0
    while time.monotonic() < stop - 1:
        time.sleep(every)
        os.kill(int(reloaded.read_text()), signal.SIGHUP)
        reloads += 1
    for t in threads:
        t.join()
    return counts[0], counts[1], reloads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--every", type=float, default=0.5)
    parser.add_argument("--delay", type=float, default=0.01)
    args = parser.parse_args()
    bento, challenger = upstream(args.delay), upstream(3 * args.delay)
    for setup in ("one nginx", "front and switch", "front and switch, shadow"):
        with tempfile.TemporaryDirectory() as tmp:
            run, port = Path(tmp), free_port()
            env = {"STACK_RUN": tmp, "STACK_HOST": "127.0.0.1", "PROXY_PORT": str(port)}
            started = []
            if setup == "one nginx":  # compose's configuration, in front of the upstream directly
                (run / "nginx").mkdir()
                (run / "nginx.conf").write_text(proxy.render(env, f"127.0.0.1:{bento.server_port}"))
                started.append(nginx(run / "nginx.conf", run / "nginx", run / "nginx.pid", run / "nginx.log"))
                reloaded = run / "nginx.pid"
            else:
                shadow = challenger.server_port if setup.endswith("shadow") else None
                switch = proxy.write(env, bento.server_port, shadow_port=shadow, share=0.5)
                started.append(nginx(switch, run / "switch", run / "switch.pid", run / "switch.log"))
                started.append(nginx(proxy.write_front(env), run / "nginx", run / "nginx.pid", run / "nginx.log"))
                reloaded = run / "switch.pid"
            try:
                sent, failed, reloads = load(f"http://127.0.0.1:{port}/predict/", args.duration, reloaded, args.every)
            finally:
                for process in started:
                    process.send_signal(signal.SIGQUIT)
                    process.wait(30)
            print(f"{setup}: {failed} of {sent} requests failed under {reloads} reloads in {args.duration:g} s "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
