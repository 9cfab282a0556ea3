"""The service with a bearer token (CIFAR10_API_TOKEN): which routes ask for it, and a person's path through the
Swagger UI in a real headless browser: authorize, upload an image with "Try it out", read the prediction."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.helpers import image_bytes, require, serve_service, stop_server

TOKEN = "test-token-5f1c2a"


@pytest.fixture(scope="module")
def server(serving_model, tmp_path_factory):
    proc, url = serve_service(serving_model, tmp_path_factory.mktemp("serve-token") / "serve.log",
                              {"CIFAR10_API_TOKEN": TOKEN})
    try:
        yield url
    finally:
        stop_server(proc)


def _predict(server: str, **headers) -> httpx.Response:
    return httpx.post(f"{server}/predict", files={"file": ("car.jpg", image_bytes(1), "image/jpeg")},
                      headers=headers, timeout=30)


def test_the_token_guards_prediction_metadata_and_metrics_never_health(server):
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/livez", "/readyz", "/healthz", "/docs.json", "/"):
        assert httpx.get(f"{server}{path}", timeout=30).status_code == 200, path
    for resp in (_predict(server), _predict(server, Authorization="Bearer nope"),
                 httpx.post(f"{server}/metadata", json={}, timeout=30), httpx.get(f"{server}/metrics", timeout=30)):
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer", resp.text
        assert "Authorization: Bearer" in resp.json()["error"]
    assert _predict(server, **bearer).status_code == 200
    assert httpx.get(f"{server}/metrics", headers=bearer, timeout=30).status_code == 200
    metadata = httpx.post(f"{server}/metadata", json={}, headers=bearer, timeout=30)
    assert metadata.status_code == 200 and TOKEN not in metadata.text


def test_the_api_document_names_the_scheme_on_the_guarded_routes(server):
    spec = httpx.get(f"{server}/docs.json", timeout=30).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path in ("/predict", "/predict_batch", "/metadata"):
        operation = spec["paths"][path]["post"]
        assert operation["security"] == [{"bearerAuth": []}] and "401" in operation["responses"], path


@pytest.fixture
def browser():
    require("chromedriver", "chromedriver not found: run .ci/setup-browser.sh (Debian's chromium and chromium-driver)")
    driver_path = shutil.which("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_swagger_ui_authorizes_uploads_an_image_and_shows_the_prediction(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "car.jpg"
    image.write_bytes(image_bytes(1))
    wait = WebDriverWait(browser, 30)

    def click(css: str) -> None:
        wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, css))).click()

    page = httpx.get(f"{server}/", timeout=30)
    assert "script-src" not in page.headers["content-security-policy"]  # only the page's own: no tag manager
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    browser.get(f"{server}/")
    click(".scheme-container .btn.authorize")
    wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, ".modal-ux input"))).send_keys(TOKEN)
    click(".modal-ux .auth-btn-wrapper .btn.authorize")
    click(".modal-ux .btn-done")
    click("#operations-Service_APIs-CIFAR10Classifier__predict .opblock-summary")
    click("#operations-Service_APIs-CIFAR10Classifier__predict .try-out__btn")
    wait.until(ready.presence_of_element_located(
        (By.CSS_SELECTOR, "#operations-Service_APIs-CIFAR10Classifier__predict input[type=file]"))).send_keys(str(image))
    click("#operations-Service_APIs-CIFAR10Classifier__predict .btn.execute")
    status = wait.until(ready.visibility_of_element_located(
        (By.CSS_SELECTOR, "#operations-Service_APIs-CIFAR10Classifier__predict .live-responses-table tbody .response-col_status")))
    body = browser.find_element(By.CSS_SELECTOR, "#operations-Service_APIs-CIFAR10Classifier__predict .live-responses-table pre")
    assert status.text.strip().startswith("200"), (status.text, body.text)
    assert '"label"' in body.text and '"probabilities"' in body.text, body.text
    curl = browser.find_element(By.CSS_SELECTOR, "#operations-Service_APIs-CIFAR10Classifier__predict .curl-command").text
    assert f"Authorization: Bearer {TOKEN}" in curl
