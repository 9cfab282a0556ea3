"""The front door of the local stacks: nginx's configurations, rendered into the state folder.

Two nginx servers (Debian's package, .ci/setup-nginx.sh), each a supervisord program of the ``proxy`` part:

- **the front** (``proxy``, STACK_RUN/nginx.conf) is the only listener clients reach, on STACK_HOST:PROXY_PORT.
  It holds the client side: timeouts, connection limits, the size limit, TLS, the access log. nginx reads a
  request's header and whole body before the Bento sees it, so slow or idle clients cost nginx a connection,
  not a Bento worker; what it bounds is in docs/security.md. Its configuration never changes while it runs.
- **the switch** (``switch``, STACK_RUN/switch.conf) listens on a socket in STACK_RUN and forwards to the Bento
  slot that serves (training/deploy/follow.py rewrites it and reloads it when the champion moves, and adds the
  shadow's mirror). A reload's old worker closes its kept-alive connections; a client that sent a request on
  one as it closed would get no answer, so clients never hold connections to the switch: the front does, and
  sends such a request again (:data:`RETRY_STALE`).

    python -m training.deploy.proxy > deploy/nginx/nginx.conf     # compose's front: one nginx, no switching
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


# The front's retry of a request its kept-alive connection to the switch lost: a reload's old worker closes
# idle connections at once, and one may close as the front sends on it. nginx gives a stale kept-alive
# connection one more try; `non_idempotent` lets that include POST. The old worker never began such a request,
# and a prediction changes nothing that running it twice would.
RETRY_STALE = "error non_idempotent"


def _proxied(read_timeout_s: int, front: bool = True, next_upstream: str = "off") -> str:
    """The directives of a location that forwards to an upstream; behind the ``front``, the client is the one the
    front names."""
    client, scheme = ("$remote_addr", "$scheme") if front else ("$http_x_forwarded_for", "$http_x_forwarded_proto")
    return f"""            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            # The Bento checks the bearer token itself (CIFAR10_API_TOKEN): nginx passes it on untouched.
            proxy_set_header Authorization $http_authorization;
            # The client as the front saw it; whatever chain a client sends is not passed on as if it were true.
            proxy_set_header X-Forwarded-For {client};
            proxy_set_header X-Forwarded-Proto {scheme};
            proxy_next_upstream {next_upstream};
            proxy_connect_timeout 5s;
            proxy_send_timeout {read_timeout_s}s;
            proxy_read_timeout {read_timeout_s}s;"""


def _shadow(run: str, upstream: str, share: float) -> tuple[str, str]:
    """The http-level and server-level parts that mirror ``share`` of /predict requests to ``upstream`` (a
    challenger) and log both answers of each mirrored one to STACK_RUN/shadow.log (training/deploy/shadow.py).

    nginx's ``mirror`` holds a client's connection until the mirrored request is answered: a kept-alive client's
    next request then waits for the challenger, and a reload in that time drops it. So the mirror goes to a relay
    (a second server of the same nginx, on a socket in STACK_RUN) that answers at once and mirrors the request
    on to the challenger itself: clients wait for nothing the challenger does.
    """
    from training.deploy.shadow import MIRROR_TIMEOUT_S

    # split_clients takes percents with two decimals: the smallest share above 0 is 0.01%.
    sample = "* 1;" if share >= 1 else f"{max(share * 100, 0.01):.2f}% 1;\n        * \"\";"
    fields = ('"status":"$status","class":"$upstream_http_x_predicted_class",'
              '"confidence":"$upstream_http_x_confidence","time":"$upstream_response_time"')
    http = f"""
    # Shadow: a share of /predict requests is also sent to the challenger, whose answer is logged, not returned.
    split_clients "$request_id" $shadow_sample {{
        {sample}
    }}
    log_format shadow_champion escape=json '{{"side":"champion","id":"$request_id",{fields}}}';
    log_format shadow_challenger escape=json '{{"side":"challenger","id":"$http_x_request_id",{fields}}}';
    upstream challenger {{
        server {upstream} max_fails=0;
        keepalive 8;
        keepalive_timeout 4s;
    }}

    # The relay: takes the mirrored copy, answers at once (stub_status's 405), and sends the copy on.
    server {{
        listen unix:{run}/shadow.sock;
        access_log off;

        location / {{
            mirror /_challenger;
            mirror_request_body on;
            stub_status;
        }}

        location = /_challenger {{
            internal;
            log_subrequest on;
            access_log {run}/shadow.log shadow_challenger;
            proxy_pass http://challenger$request_uri;
{_proxied(MIRROR_TIMEOUT_S, front=False)}
            proxy_set_header X-Request-Id $http_x_request_id;
            # The relay's own client (the front door) has gone by the time the challenger answers.
            proxy_ignore_client_abort on;
        }}
    }}
"""
    server = f"""
        location ~ ^/predict/?$ {{
            proxy_pass http://bento;
{_proxied(UPSTREAM_READ_S, front=False)}
            mirror /_shadow;
            mirror_request_body on;
            access_log {run}/shadow.log shadow_champion if=$shadow_sample;
        }}

        location = /_shadow {{
            internal;
            access_log off;
            if ($shadow_sample = "") {{
                return 204;
            }}
            proxy_pass http://unix:{run}/shadow.sock:$request_uri;
{_proxied(5, front=False)}
            proxy_set_header X-Request-Id $request_id;
        }}
"""
    return http, server


def _main(run: str, pid: str, as_root: bool | None) -> str:
    # Started by root (CI), nginx would hand its workers to `nobody`, which may not enter the private state folder.
    user = "user root;\n" if (os.geteuid() == 0 if as_root is None else as_root) else ""
    return f"""daemon off;
{user}worker_processes 1;
# Two descriptors per proxied request: the limit a desktop's shell gives (often 1024) would cut it short.
worker_rlimit_nofile {2 * WORKER_CONNECTIONS + 64};
# A reload's old worker stops holding a client (one trickling its body, say) after this, so a switch ends.
worker_shutdown_timeout {UPSTREAM_READ_S}s;
pid {pid};
error_log stderr warn;

events {{
    worker_connections {WORKER_CONNECTIONS};
}}
"""


def _temp(run: str, prefix: str) -> str:
    # One level under STACK_RUN: nginx makes a temp folder's last component only (compose's is an empty tmpfs).
    return "\n".join(f"    {kind}_temp_path {run}/{prefix}-{kind};" for kind in TEMP_KINDS)


def render(env: dict[str, str], upstream: str | None = None, access_log: str | None = None,
           as_root: bool | None = None) -> str:
    """The front's configuration: STACK_HOST:PROXY_PORT, forwarding to ``upstream`` (host:port; by default the
    switch's socket in STACK_RUN, retrying what a stale kept-alive connection lost); its access log in STACK_RUN
    unless ``access_log`` names another file."""
    run, host, port = env["STACK_RUN"], env["STACK_HOST"], env["PROXY_PORT"]
    tls = tls_files(env)
    listen = f"{host}:{port} ssl" if tls else f"{host}:{port}"
    ssl = (f"\n        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};\n"
           "        ssl_protocols TLSv1.2 TLSv1.3;\n        ssl_session_cache shared:tls:1m;") if tls else ""
    # compose: one Bento that never switches, and a request that failed there fails. Here: the switch.
    backend, retry = (upstream, "off") if upstream else (f"unix:{run}/switch.sock", RETRY_STALE)
    return f"""# Rendered by training/deploy/proxy.py: the front door.
{_main(run, f"{run}/nginx.pid", as_root)}
http {{
{_temp(run, "nginx")}
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
        server {backend} max_fails=0;
        keepalive 32;
        # Shorter than the Bento's own idle timeout: nginx never sends a request on a connection the Bento
        # is closing, which (with no retries) would fail it.
        keepalive_timeout 4s;
    }}

    server {{
        listen {listen};{ssl}

        location / {{
            proxy_pass http://bento;
{_proxied(UPSTREAM_READ_S, next_upstream=retry)}
        }}
    }}
}}
"""


def render_switch(env: dict[str, str], upstream: str, shadow: str | None = None, share: float = 0.0,
                  as_root: bool | None = None) -> str:
    """The switch's configuration: STACK_RUN/switch.sock forwarding to ``upstream`` (host:port, a Bento slot).
    With ``shadow`` (host:port) and a ``share`` above 0, that share of /predict requests is mirrored there. With
    FOLLOW_PORT, the follower's /metrics is served at /shadow/metrics."""
    run = env["STACK_RUN"]
    shadow_http, shadow_server = _shadow(run, shadow, share) if shadow and share > 0 else ("", "")
    follower = (f"""
        # The follower's figures of the challenger in shadow (it checks the bearer token itself).
        location = /shadow/metrics {{
            proxy_pass http://127.0.0.1:{env["FOLLOW_PORT"]}/metrics;
{_proxied(10, front=False)}
        }}
""" if env.get("FOLLOW_PORT") else "")
    return f"""# Rendered by training/deploy/proxy.py; training/deploy/follow.py rewrites the upstream and reloads it.
{_main(run, f"{run}/switch.pid", as_root)}
http {{
{_temp(run, "switch")}
    server_tokens off;
    access_log off;  # the front logs every request
    client_max_body_size {body_limit(env)};
    client_body_buffer_size 128k;

    upstream bento {{
        server {upstream} max_fails=0;
        keepalive 32;
        # Shorter than the Bento's own idle timeout: nginx never sends a request on a connection the Bento
        # is closing, which (with no retries) would fail it.
        keepalive_timeout 4s;
    }}
{shadow_http}
    server {{
        listen unix:{run}/switch.sock;

        location / {{
            proxy_pass http://bento;
{_proxied(UPSTREAM_READ_S, front=False)}
        }}
{shadow_server}{follower}    }}
}}
"""


def _replace(path: Path, text: str, check=None) -> Path:
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        if check:
            check(tmp)
        tmp.replace(path)  # nginx never reads a half-written file
    return path


def write_front(env: dict[str, str]) -> Path:
    """Write the front's configuration to STACK_RUN/nginx.conf; return its path."""
    run = Path(env["STACK_RUN"])
    for prefix in ("nginx", "switch"):  # each one's prefix (-p): where `nginx -t` looks for what it does not name
        (run / prefix).mkdir(parents=True, exist_ok=True)
    return _replace(run / "nginx.conf", render(env))


def write(env: dict[str, str], upstream_port: int | str, check=None, shadow_port: int | None = None,
          share: float = 0.0) -> Path:
    """Write the switch's configuration to STACK_RUN/switch.conf; return its path. ``check`` (a callable) gets
    the new file first and may raise: the configuration in place then stays as it was. With ``shadow_port``,
    ``share`` of /predict requests is mirrored to that loopback port."""
    run = Path(env["STACK_RUN"])
    (run / "switch").mkdir(parents=True, exist_ok=True)
    text = render_switch(env, f"127.0.0.1:{upstream_port}",
                         shadow=f"127.0.0.1:{shadow_port}" if shadow_port else None, share=share)
    return _replace(run / "switch.conf", text, check)


# deploy/nginx/nginx.conf, compose's front door: the same configuration, in front of the `bento` service.
COMPOSE = {"STACK_RUN": "/var/lib/nginx", "STACK_HOST": "0.0.0.0", "PROXY_PORT": "3000"}


def compose_conf() -> str:
    """deploy/nginx/nginx.conf as this module renders it (a unit test keeps the two equal)."""
    return render(COMPOSE, "bento:3000", access_log="/dev/stdout", as_root=False)


if __name__ == "__main__":
    sys.stdout.write(compose_conf())
