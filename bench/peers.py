"""The fastest peers side by side: the same ONNX model and JPEG decoding behind six servers, one wrk.

Servers, one after the other on this machine (all six use its CPUs; size them for 2 cores):

- ``triton``: Triton through PyTriton, dynamic batching, the JPEG's bytes as a BYTES input
  sent with Triton's binary-tensor HTTP extension (``bench/peer_servers/triton_server.py``);
- ``ray``: Ray Serve, two replicas with ``@serve.batch`` (``ray_server.py``);
- ``litserve``: LitServe, two inference workers with batching (``litserve_server.py``);
- ``mlserver``: MLServer, adaptive batching over two parallel workers, the JPEG base64 in
  V2 JSON: it has no multipart route (``mlserver_runtime.py``);
- ``bentoml_batchable``: BentoML's own ``batchable=True`` API (``bentoml_batchable.py``);
- ``ours``: ``service:CIFAR10Classifier``, as ``bench_serving``'s server (a) runs it.

Every peer decodes the JPEG itself with ``serving.images`` and runs ``bench_serving``'s
model (64/128/128 with flip TTA, untrained) in ONNX Runtime on one intra-op thread per
call, two calls side by side. Before measuring, each answers the test image and must
name the class ONNX Runtime gives here. Then wrk (one thread; the body per protocol is
built here and read by its Lua script) at concurrency 1, 8, 32 and 64, as ``bench_serving``.

Each third-party peer runs in a virtual environment of its own under
``STATE/peers/venvs/NAME`` (they conflict: PyTriton needs numpy<2, MLServer fastapi<0.116),
made on first use from the pins in :data:`PEERS` with the uv of ``.venv`` and Python 3.11,
reused while its pins are unchanged:

    .venv/bin/uv venv --python 3.11 STATE/peers/venvs/NAME
    .venv/bin/uv pip install --python STATE/peers/venvs/NAME/bin/python PINS...

The two BentoML servers run in the project's ``.venv``. A peer that cannot be installed,
started or answered is reported with its error instead of numbers.

    .venv/bin/python -m bench.bench_serving --only d --widths 64,128,128 --tta   # the model, once
    .venv/bin/python -m bench.peers [--duration 10] [--only triton,ours] [--setup] [--state DIR]

Prints a Markdown table and writes ``STATE/peers/results.json`` (``results-int8.json`` with ``--int8``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.bench_serving import CONCURRENCY, START_TIMEOUT_S, WRK_DONE, load_levels, wrk_inputs
from bench.peer_servers.common import MAX_BATCH_SIZE, MODEL_NAME
from tests.helpers import ROOT
from training.packaging.server import bentoml_serve, free_port, start_server, stop_server

PYTHON = "3.11"
# The project's versions of what every peer runs besides its server, so only the server differs.
COMMON_PINS = ("onnxruntime==1.32.0", "pillow==13.0.0", "simplejpeg==1.9.0")
# MLServer needs a batch window above 0 to batch at all. It sends a batch to a worker as soon as the
# window closes, busy or not, so a longer one only adds latency: of 1, 10 and 50 ms, 1 ms gave the
# most requests per second at concurrency 8 and 32.
MLSERVER_BATCH_TIME_S = 0.001
MULTIPART_BOUNDARY = "----cifar10benchboundary"
# Triton's Python backend stub loads the system's shared libpython3.11, and with it the stdlib of
# the venv's interpreter: any other 3.11 (a newer pyenv build) fails in the stub with
# "'_thread.RLock' object has no attribute '_recursion_count'". So PyTriton's venv is made from it.
SYSTEM_PYTHON = "/usr/bin/python3.11" if Path("/usr/bin/python3.11").exists() else PYTHON


@dataclass
class Run:
    """What a server command needs: its environment's Python, ports and folders."""

    python: Path
    port: int
    model_dir: Path
    tag: str
    state: Path


@dataclass
class Peer:
    """One server: how to install and start it, where to send the image, and how to read its answer."""

    title: str
    config: str
    command: Callable[[Run], list[str]]
    protocol: str  # "multipart", "triton" or "v2"
    route: str
    ready: str
    pins: tuple[str, ...] = ()  # empty: the project's .venv
    python: str = PYTHON  # the interpreter uv makes the venv from
    env: dict[str, str] = field(default_factory=dict)
    # PyTriton removes its workspace on SIGINT; the others are stopped by their process group.
    stop_signal: int = signal.SIGTERM


def python_m(module: str, *args: object) -> Callable[[Run], list[str]]:
    return lambda run: [str(run.python), "-m", f"bench.peer_servers.{module}", str(run.model_dir),
                        str(run.port), *(str(a(run)) for a in args)]


def mlserver(run: Run) -> list[str]:
    """``mlserver start`` on a folder with this run's server and model settings."""
    folder = run.state / "peers" / "mlserver"
    folder.mkdir(parents=True, exist_ok=True)
    # parallel_workers: the model runs in 2 worker processes, HTTP and batching in the main one.
    (folder / "settings.json").write_text(json.dumps({
        "debug": False, "parallel_workers": 2, "host": "127.0.0.1", "http_port": run.port,
        "grpc_port": free_port(), "metrics_port": free_port(), "metrics_dir": str(folder / "metrics")}))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": MODEL_NAME, "implementation": "bench.peer_servers.mlserver_runtime.Classifier",
        "max_batch_size": MAX_BATCH_SIZE, "max_batch_time": MLSERVER_BATCH_TIME_S, "parameters": {"uri": str(run.model_dir)}}))
    # Its CLI through the interpreter, so that the checkout (the working directory) is on the path
    # where MLServer imports the runtime.
    return [str(run.python), "-c", "from mlserver.cli import main; main()", "start", str(folder)]


PEERS = {
    "triton": Peer(
        "Triton 2.51 via PyTriton 0.7.0",
        "2 model instances (threads) sharing one ORT session; dynamic batcher, max batch 64, queue delay 0 "
        "(default); HTTP binary-tensor extension, JPEG as a BYTES input",
        python_m("triton_server", lambda run: free_port(), lambda run: free_port()), "triton",
        # Triton's own /v2/health/ready answers 200 before PyTriton has loaded the model.
        f"/v2/models/{MODEL_NAME}/infer", f"/v2/models/{MODEL_NAME}/ready",
        ("nvidia-pytriton==0.7.0", "numpy==1.26.4", *COMMON_PINS), python=SYSTEM_PYTHON,
        env={"PYTRITON_HOME": "{state}/peers/pytriton"}, stop_signal=signal.SIGINT),
    "ray": Peer(
        "Ray Serve 2.60.0",
        "2 replicas x 1 CPU (ray.init num_cpus=2, no dashboard); @serve.batch max 64, wait 10 ms (default); "
        "max_ongoing_requests 64; decode in the request handler",
        python_m("ray_server", lambda run: run.state / "peers" / "ray"), "multipart", "/predict", "/predict",
        ("ray[serve]==2.60.0", "python-multipart==0.0.34", "numpy==2.4.6", *COMMON_PINS),
        env={"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}),
    "litserve": Peer(
        "LitServe 0.2.19",
        "accelerator cpu, workers_per_device 2, API servers = workers (default); max_batch_size 64, "
        "batch_timeout 0 (default); decode_request in the worker",
        python_m("litserve_server"), "multipart", "/predict", "/health",
        ("litserve==0.2.19", "python-multipart==0.0.34", "numpy==2.4.6", *COMMON_PINS)),
    "mlserver": Peer(
        "MLServer 1.7.1",
        f"parallel_workers 2; adaptive batching max 64, max_batch_time {MLSERVER_BATCH_TIME_S * 1000:g} ms; "
        "V2 JSON, JPEG base64 in a BYTES input; uvloop<0.22, fastapi<0.116",
        mlserver, "v2", f"/v2/models/{MODEL_NAME}/infer", f"/v2/models/{MODEL_NAME}/ready",
        ("mlserver==1.7.1", "uvloop==0.21.0", "fastapi==0.115.14", "numpy==2.4.6", *COMMON_PINS)),
    "bentoml_batchable": Peer(
        "BentoML 1.4.40, batchable API",
        "2 workers; @bentoml.api(batchable=True) max 64, max_latency_ms 1000; decode in the field's validator",
        lambda run: bentoml_serve("bench.peer_servers.bentoml_batchable:Batched", run.port,
                                  "--arg", f"model_tag={run.tag}"), "multipart", "/predict", "/readyz"),
    "ours": Peer(
        "our Bento (service.py), BentoML 1.4.40",
        "2 workers, in-process micro-batching max 64, 2 single-thread calls side by side across workers",
        lambda run: bentoml_serve("service:CIFAR10Classifier", run.port, "--arg", f"model_tag={run.tag}"),
        "multipart", "/predict", "/readyz"),
}


def venv(name: str, peer: Peer, state: Path) -> Path:
    """The Python of ``peer``'s virtual environment, made from its pins unless it already has them."""
    if not peer.pins:
        return Path(sys.executable)
    folder = state / "peers" / "venvs" / name
    python, marker = folder / "bin" / "python", folder / "pins.txt"
    pins = "\n".join([f"python {peer.python}", *peer.pins]) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == pins:
        return python
    uv = str(Path(sys.executable).with_name("uv"))
    commands = [[uv, "venv", "-q", "--clear", "--python", peer.python, str(folder)],
                [uv, "pip", "install", "-q", "--python", str(python), *peer.pins]]
    for command in commands:
        print("+", shlex.join(command), flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command[:3])} failed: {result.stderr.strip()[-1500:]}")
    marker.write_text(pins)
    return python


def versions(python: Path) -> dict[str, str]:
    """Every package in the environment of ``python``, as ``uv pip freeze`` lists it."""
    uv = str(Path(sys.executable).with_name("uv"))
    out = subprocess.run([uv, "pip", "freeze", "--python", str(python)], capture_output=True, text=True).stdout
    return dict(line.split("==", 1) for line in out.splitlines() if "==" in line)


def request_body(protocol: str, jpeg: bytes) -> tuple[bytes, dict[str, str]]:
    """The bytes and headers that carry one JPEG in ``protocol``; wrk sends them unchanged."""
    if protocol == "multipart":  # the body bench_serving's Lua script builds
        body = (f"--{MULTIPART_BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"img.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{MULTIPART_BOUNDARY}--\r\n".encode()
        return body, {"Content-Type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"}
    if protocol == "triton":
        # Binary-tensor extension: the JSON header, then the BYTES tensor (each element a 4-byte
        # little-endian length and its bytes); the answer comes back as JSON.
        tensor = struct.pack("<I", len(jpeg)) + jpeg
        header = json.dumps({
            "inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(tensor)}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}]}).encode()
        return header + tensor, {"Content-Type": "application/octet-stream",
                                 "Inference-Header-Content-Length": str(len(header))}
    if protocol == "v2":
        body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                       "data": [base64.b64encode(jpeg).decode()]}]}).encode()
        return body, {"Content-Type": "application/json"}
    raise ValueError(protocol)


def answered_probabilities(protocol: str, answer: bytes) -> np.ndarray:
    """The class probabilities in one server's answer to :func:`request_body`."""
    data = json.loads(answer)
    if protocol == "multipart":
        data = data[0] if isinstance(data, list) else data
        return np.array(list(data["probabilities"].values()))
    return np.array(data["outputs"][0]["data"], dtype=np.float64)


def wrk_script(path: Path, headers: dict[str, str]) -> Path:
    """A wrk script that POSTs the body in the file ``BENCH_IMAGE`` names, with ``headers``."""
    lines = ['wrk.method = "POST"', 'local f = assert(io.open(os.getenv("BENCH_IMAGE"), "rb"))',
             "wrk.body = f:read(\"*a\")", "f:close()",
             *(f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items())]
    path.write_text("\n".join(lines) + "\n" + WRK_DONE)
    return path


def ask(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:  # the server's own words say why
        raise RuntimeError(f"POST {url}: {exc.code} {exc.read()[:1000]!r}") from None


def stop(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the server's main process so it shuts down its own way, then its whole process group."""
    try:
        os.kill(proc.pid, sig)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    stop_server(proc)


def measure(name: str, peer: Peer, run: Run, jpeg: bytes, expected: np.ndarray, args) -> dict:
    """Start ``peer``, check its answer for ``jpeg`` against ``expected``, then wrk at every concurrency."""
    result = {"title": peer.title, "config": peer.config, "protocol": peer.protocol}
    result["versions"] = {k: v for k, v in versions(run.python).items()
                          if k in ("nvidia-pytriton", "ray", "litserve", "mlserver", "bentoml", "onnxruntime",
                                   "numpy", "pillow", "fastapi", "uvloop")}
    body, headers = request_body(peer.protocol, jpeg)
    folder = run.state / "peers"
    (folder / f"{name}.body").write_bytes(body)
    script = wrk_script(folder / f"{name}.lua", headers)
    log = folder / f"{name}.log"
    env = {**os.environ, "BENTOML_HOME": str(run.state / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "True", "PATH": f"{run.python.parent}:{os.environ['PATH']}",
           **{k: v.format(state=run.state) for k, v in peer.env.items()}}
    t0 = time.monotonic()
    # From the checkout, as every bench module runs: the servers import bench.peer_servers and serving
    # from it (their worker processes inherit the path), and write only under the state folder.
    proc = start_server(peer.command(run), log, run.port, START_TIMEOUT_S, env=env, cwd=ROOT, ready=peer.ready)
    result["start_s"] = round(time.monotonic() - t0, 1)
    url = f"http://127.0.0.1:{run.port}"
    try:
        probs = answered_probabilities(peer.protocol, ask(url + peer.route, body, headers))
        result["answer"] = {"class_id": int(np.argmax(probs)), "max_abs_diff": float(np.abs(probs - expected).max())}
        if int(np.argmax(probs)) != int(np.argmax(expected)):
            raise RuntimeError(f"answered class {int(np.argmax(probs))} where ONNX Runtime here gives "
                               f"{int(np.argmax(expected))}: {probs.round(4).tolist()}")
        result["rows"] = load_levels(name, proc, log, url, args.duration, script, folder / f"{name}.body",
                                     route=peer.route, ready=peer.ready, concurrency=args.concurrency)
    finally:
        stop(proc, peer.stop_signal)
    return result


def expected_probabilities(model_dir: Path, jpeg: bytes) -> np.ndarray:
    """What the model says about ``jpeg`` in this process, decoded as the service decodes it."""
    from serving.images import decode_image
    from serving.model import onnx_session

    session = onnx_session(model_dir / os.environ.get("PEER_MODEL_FILE", "model.onnx"), threads=1)
    return session.run(None, {session.get_inputs()[0].name: decode_image(jpeg)[None].astype("float32")})[0][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)),
                        help="wrk connections, comma-separated")
    parser.add_argument("--state", type=Path, default=Path("/tmp/serving-bench"),
                        help="bench_serving's state folder: its model; the peers' venvs, logs and results go to peers/")
    parser.add_argument("--only", default=",".join(PEERS), help="comma-separated subset of " + ", ".join(PEERS))
    parser.add_argument("--setup", action="store_true", help="only make the virtual environments")
    parser.add_argument("--int8", action="store_true",
                        help="every peer runs the model's int8 file, and ours the model that carries it "
                             "(bench_serving --precision auto), as it serves where int8 pays")
    args = parser.parse_args()
    args.concurrency = tuple(int(c) for c in args.concurrency.split(","))
    names = args.only.split(",")
    if unknown := set(names) - set(PEERS):
        sys.exit(f"unknown peers: {', '.join(sorted(unknown))}; known: {', '.join(PEERS)}")
    if not shutil.which("wrk") and not args.setup:
        sys.exit("wrk not found: apt-get install -y wrk")
    tag_file = args.state / f"model_tag_64_128_128_tta{'_auto' if args.int8 else ''}"
    if args.int8:  # the servers inherit it
        os.environ["PEER_MODEL_FILE"] = "model.int8.onnx"
    if not tag_file.exists():
        sys.exit(f"{tag_file} missing: run `.venv/bin/python -m bench.bench_serving --only d --widths 64,128,128 "
                 f"--tta{' --precision auto' if args.int8 else ''}` first (it makes the model)")
    tag = tag_file.read_text().strip()
    model_dir = args.state / "bentoml" / "models" / tag.replace(":", "/")
    (args.state / "peers").mkdir(parents=True, exist_ok=True)
    _, image = wrk_inputs(args.state)
    jpeg = image.read_bytes()
    expected = expected_probabilities(model_dir, jpeg)
    results = {"load_before": os.getloadavg(), "cpu_model": cpu_model(), "cpus": os.cpu_count(),
               "model": f"build_model((64, 128, 128)) untrained, tta=True, {'int8' if args.int8 else 'float'}",
               "tag": tag, "duration_s": args.duration,
               "expected_class": int(np.argmax(expected)), "peers": {}}
    out = args.state / "peers" / f"results{'-int8' if args.int8 else ''}.json"
    t_start = time.monotonic()
    for name in names:
        peer = PEERS[name]
        try:
            python = venv(name, peer, args.state)
            if args.setup:
                continue
            run = Run(python, free_port(), model_dir, tag, args.state)
            results["peers"][name] = measure(name, peer, run, jpeg, expected, args)
        except Exception as exc:  # reported in the table, with the error, instead of dropped
            traceback.print_exc()
            print(f"{name} failed: {exc}", flush=True)
            results["peers"][name] = {"title": peer.title, "config": peer.config,
                                      "error": f"{type(exc).__name__}: {exc}"}
        out.write_text(json.dumps(results, indent=1))  # keep partial results
    if args.setup:
        return
    results["load_after"] = os.getloadavg()
    results["wall_s"] = round(time.monotonic() - t_start, 1)
    out.write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"\nresults: {out}")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def print_table(results: dict) -> None:
    """Markdown: a row per server and concurrency; a failed server's row names its error."""
    print(f"\n{results['cpus']} CPUs ({results['cpu_model']}); load before {results['load_before']}, "
          f"after {results['load_after']}; {results['wall_s']} s in all; {results['duration_s']} s per wrk run")
    answers = ", ".join(f"{name} {data['answer']['class_id']} (max |p - here| {data['answer']['max_abs_diff']:.1g})"
                        for name, data in results["peers"].items() if "answer" in data)
    print(f"class of the test image: {results['expected_class']} here; answered: {answers}")
    print("| server | conc | req/s | p50 ms | p99 ms | errors | non-2xx | client CPU | server CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for data in results["peers"].values():
        if "error" in data:
            error = data["error"].replace("|", "\\|").replace("\n", " ")[:600]
            print(f"| {data['title']} | | failed: {error} | | | | | | |")
            continue
        for row in data["rows"]:
            print(f"| {data['title']} | {row['concurrency']} | {row['rps']:.1f} | {row['p50_ms']:.1f} | "
                  f"{row['p99_ms']:.1f} | {row['errors']} | {row['non_2xx']} | {row['client_cpu_share']:.0%} | "
                  f"{row['server_cpu_share']:.0%} |")


if __name__ == "__main__":
    main()
