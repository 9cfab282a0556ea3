"""The front door of the local stacks: nginx's configuration, rendered into the state folder.

nginx (Debian's package, .ci/setup-nginx.sh) is the only listener clients reach, on STACK_HOST:PROXY_PORT; the
Bento it forwards to listens on a loopback port of its own (training/deploy/follow.py switches that port when
the champion moves). nginx reads a request's header and whole body before the Bento sees it, so slow or idle
clients cost nginx a connection, not a Bento worker; what it bounds is in docs/security.md.

    python -m training.deploy.proxy > deploy/nginx/nginx.conf     # compose's copy of the configuration
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# The slowest a client may send its request header, or its body between two reads; over it, 408. Well
# below the service's own whole-body deadline (serving/http.py), which then only sees complete bodies.
CLIENT_TIMEOUT_S = 10
# How long an idle kept-alive client connection stays open, and how many requests one may carry.
KEEPALIVE_S = 30
KEEPALIVE_REQUESTS = 1000
# Connections nginx holds at once, idle ones included (each proxied request takes a second one to the Bento).
WORKER_CONNECTIONS = 4096
# Requests past their header that one client address may have in nginx at once, and all addresses together;
# more: 429. Idle and slow-header connections are not counted (nginx counts a request once its header is in).
# The total keeps requests that trickle their bodies (each below the read timeout) from holding every
# connection, whatever the number of addresses they come from.
CONN_PER_ADDRESS = 64
CONN_TOTAL = 1024
# Longer than the Bento's 30-second request timeout, so the Bento's own 504 reaches the client first.
UPSTREAM_READ_S = 60
TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
# Where nginx is when it is not on PATH: Debian installs it in sbin, which a user's PATH may leave out.
SBIN = ("/usr/sbin", "/sbin")


def nginx_binary(path: str | None = None) -> str | None:
    """The nginx executable: on PATH, else in sbin; None when it is not installed."""
    return shutil.which("nginx", path=os.pathsep.join([path or os.environ.get("PATH", ""), *SBIN]))


def body_limit(env: dict[str, str]) -> int:
    """The service's own request-size limit (CIFAR10_MAX_BODY_BYTES or its default), in bytes."""
    from serving.settings import ServingSettings

    raw = env.get("CIFAR10_MAX_BODY_BYTES")
    return int(raw) if raw else ServingSettings.max_body_bytes


def tls_files(env: dict[str, str]) -> tuple[str, str] | None:
    """(certificate, key) when both CIFAR10_TLS_CERT and CIFAR10_TLS_KEY are set; one without the other is an error."""
    cert, key = env.get("CIFAR10_TLS_CERT", "").strip(), env.get("CIFAR10_TLS_KEY", "").strip()
    if bool(cert) != bool(key):
        raise SystemExit("proxy: set both CIFAR10_TLS_CERT and CIFAR10_TLS_KEY (PEM files), or neither")
    return (str(Path(cert).resolve()), str(Path(key).resolve())) if cert else None


def render(env: dict[str, str], upstream: str, access_log: str | None = None, as_root: bool | None = None) -> str:
    """nginx's configuration for STACK_HOST:PROXY_PORT in front of ``upstream`` (host:port); its files under
    STACK_RUN, its access log there unless ``access_log`` names another file."""
    run, host, port = env["STACK_RUN"], env["STACK_HOST"], env["PROXY_PORT"]
    tls = tls_files(env)
    # Started by root (CI), nginx would hand its workers to `nobody`, which may not enter the private state folder.
    user = "user root;\n" if (os.geteuid() == 0 if as_root is None else as_root) else ""
    # One level under STACK_RUN: nginx makes a temp folder's last component only (compose's is an empty tmpfs).
    temp = "\n".join(f"    {kind}_temp_path {run}/nginx-{kind};" for kind in TEMP_KINDS)
    listen = f"{host}:{port} ssl" if tls else f"{host}:{port}"
    ssl = (f"\n        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};\n"
           "        ssl_protocols TLSv1.2 TLSv1.3;\n        ssl_session_cache shared:tls:1m;") if tls else ""
    return f"""# Rendered by training/deploy/proxy.py; training/deploy/follow.py rewrites the upstream and reloads nginx.
daemon off;
{user}worker_processes 1;
# Two descriptors per proxied request: the limit a desktop's shell gives (often 1024) would cut it short.
worker_rlimit_nofile {2 * WORKER_CONNECTIONS + 64};
# A reload's old worker stops holding a client (one trickling its body, say) after this, so a switch ends.
worker_shutdown_timeout {UPSTREAM_READ_S}s;
pid {run}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections {WORKER_CONNECTIONS};
}}

http {{
{temp}
    server_tokens off;
    log_format front '$remote_addr [$time_local] "$request" $status $body_bytes_sent $request_time '
                     'upstream=$upstream_addr $upstream_status $upstream_response_time';
    access_log {access_log or f"{run}/proxy-access.log"} front;

    client_header_timeout {CLIENT_TIMEOUT_S}s;
    client_body_timeout {CLIENT_TIMEOUT_S}s;
    send_timeout {CLIENT_TIMEOUT_S * 3}s;
    keepalive_timeout {KEEPALIVE_S}s;
    keepalive_requests {KEEPALIVE_REQUESTS};
    reset_timedout_connection on;
    # The service's own request-size limit: a larger body is refused here, before it is read.
    client_max_body_size {body_limit(env)};
    client_body_buffer_size 128k;
    limit_conn_zone $binary_remote_addr zone=per_address:10m;
    limit_conn_zone $server_name zone=all:1m;
    limit_conn per_address {CONN_PER_ADDRESS};
    limit_conn all {CONN_TOTAL};
    limit_conn_status 429;

    upstream bento {{
        server {upstream} max_fails=0;
        keepalive 32;
        # Shorter than the Bento's own idle timeout: nginx never sends a request on a connection the Bento
        # is closing, which (with no retries) would fail it.
        keepalive_timeout 4s;
    }}

    server {{
        listen {listen};{ssl}

        location / {{
            proxy_pass http://bento;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            # The Bento checks the bearer token itself (CIFAR10_API_TOKEN): nginx passes it on untouched.
            proxy_set_header Authorization $http_authorization;
            # The client as nginx saw it; whatever chain a client sends is not passed on as if it were true.
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            # A prediction is never sent twice: there is one upstream, and a request that failed there fails.
            proxy_next_upstream off;
            proxy_connect_timeout 5s;
            proxy_send_timeout {UPSTREAM_READ_S}s;
            proxy_read_timeout {UPSTREAM_READ_S}s;
        }}
    }}
}}
"""


def write(env: dict[str, str], upstream_port: int | str, check=None) -> Path:
    """Write the configuration to STACK_RUN/nginx.conf (and nginx's temp folders); return its path. ``check``
    (a callable) gets the new file first and may raise: the configuration in place then stays as it was."""
    run = Path(env["STACK_RUN"])
    run.mkdir(parents=True, exist_ok=True)
    (run / "nginx").mkdir(exist_ok=True)  # its prefix (-p): where `nginx -t` looks for what it does not name
    path = run / "nginx.conf"
    text = render(env, f"127.0.0.1:{upstream_port}")
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        if check:
            check(tmp)
        tmp.replace(path)  # nginx never reads a half-written file
    return path


# deploy/nginx/nginx.conf, compose's front door: the same configuration, in front of the `bento` service.
COMPOSE = {"STACK_RUN": "/var/lib/nginx", "STACK_HOST": "0.0.0.0", "PROXY_PORT": "3000"}


def compose_conf() -> str:
    """deploy/nginx/nginx.conf as this module renders it (a unit test keeps the two equal)."""
    return render(COMPOSE, "bento:3000", access_log="/dev/stdout", as_root=False)


if __name__ == "__main__":
    sys.stdout.write(compose_conf())
