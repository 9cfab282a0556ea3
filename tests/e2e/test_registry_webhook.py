"""MLflow's registry webhook wakes the follower, with a real ``mlflow server`` (SQLite) and the follower's own
HTTP server: an alias set on the server is delivered, signed, within seconds; an unsigned, forged or stale
delivery is refused and wakes nothing. Where no tracking server runs, the follower polls (test_front_door.py).
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import requests

from tests.helpers import free_port
from training.deploy import follow
from training.packaging.server import start_server, stop_server

SECRET = "webhook-test-secret"


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """A tracking server as the distributed stack configures it for webhooks; yields its URL."""
    from cryptography.fernet import Fernet

    state = tmp_path_factory.mktemp("webhook")
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(state), "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
           "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode()}
    server = start_server([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                           f"sqlite:///{state}/mlflow.db", "--default-artifact-root", f"file://{state}/artifacts",
                           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                          state / "mlflow.log", port, 180, env=env, ready="/health")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(server)


@pytest.fixture
def follower_http():
    wake, port = threading.Event(), free_port()
    server = follow.serve(port, follow.ShadowGauges(), wake, token="metrics-token", secret=SECRET)
    try:
        yield wake, f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()


def test_an_alias_move_on_the_tracking_server_wakes_the_follower(tracking_server, follower_http):
    from mlflow import MlflowClient

    wake, url = follower_http
    client = MlflowClient(tracking_uri=tracking_server, registry_uri=tracking_server)
    follow.register_webhook(client, f"{url}/webhook", SECRET)
    follow.register_webhook(client, f"{url}/webhook", SECRET)  # again, as a restarted follower does: updated
    [hook] = [h for h in client.list_webhooks() if h.name == follow.WEBHOOK_NAME]
    assert hook.url == f"{url}/webhook"
    assert {f"{e.entity.value}.{e.action.value}" for e in hook.events} == set(follow.WEBHOOK_EVENTS)
    client.create_registered_model("cifar10-cnn")
    client.create_model_version("cifar10-cnn", source="s3://bucket/nowhere")  # a server refuses local paths
    assert not wake.is_set()
    moved = time.monotonic()
    client.set_registered_model_alias("cifar10-cnn", "champion", "1")
    assert wake.wait(30), "no signed delivery reached the follower within 30 s of the alias move"
    print(f"\nalias move -> follower woken: {time.monotonic() - moved:.2f} s")
    wake.clear()
    client.delete_registered_model_alias("cifar10-cnn", "champion")
    assert wake.wait(30), "removing the alias was not delivered"


@pytest.mark.parametrize("headers", [
    {},
    {"X-MLflow-Signature": "v1,AAAA", "X-MLflow-Timestamp": "{now}", "X-MLflow-Delivery-Id": "d1"},
    {"X-MLflow-Signature": "{good_but_stale}", "X-MLflow-Timestamp": "{stale}", "X-MLflow-Delivery-Id": "d1"},
], ids=["unsigned", "forged", "replayed an hour later"])
def test_a_delivery_without_the_secrets_signature_wakes_nothing(follower_http, headers):
    import base64
    import hashlib
    import hmac

    wake, url = follower_http
    body, stale = b'{"entity": "model_version_alias"}', str(int(time.time()) - 3600)
    good = base64.b64encode(hmac.new(SECRET.encode(), f"d1.{stale}.".encode() + body, hashlib.sha256).digest())
    sent = {k: v.format(now=int(time.time()), stale=stale, good_but_stale=f"v1,{good.decode()}")
            for k, v in headers.items()}
    answer = requests.post(f"{url}/webhook", data=body, headers=sent, timeout=10)
    assert answer.status_code == 401 and not wake.is_set()
    # The metrics beside it still need the bearer token.
    assert requests.get(f"{url}/metrics", timeout=10).status_code == 401
    assert requests.get(f"{url}/metrics", headers={"Authorization": "Bearer metrics-token"},
                        timeout=10).status_code == 200
