"""Fetching: local paths, file://, http:// (local server), s3:// (SeaweedFS server), checksums, cache."""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import threading

import pytest

from training.data import fetch as fetch_module
from training.config import OFFICIAL_SHA256, OFFICIAL_URL, load_config
from training.data.fetch import FetchError, expected_checksum, fetch, parse_checksum
from tests.helpers import free_port, s3_client

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, so the download takes a few chunks


def config_for(tmp_path, url, checksum=""):
    return load_config({"state_dir": str(tmp_path / "state"), "data_url": str(url), "data_checksum": checksum,
                        "data_roots": str(tmp_path)})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(tmp_path) -> list[str]:
    folder = tmp_path / "state" / "data" / "downloads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src" / "data.zip"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path


# --- checksums ---------------------------------------------------------------------------
def test_checksum_specs():
    assert parse_checksum("") is None
    assert parse_checksum("SHA256:" + "A" * 64) == ("sha256", "a" * 64)
    assert parse_checksum("b" * 32) == ("md5", "b" * 32)
    assert parse_checksum("c" * 64) == ("sha256", "c" * 64)


@pytest.mark.parametrize("spec, message", [
    ("sha1:" + "a" * 40, "not supported; use sha256"),
    ("sha256:abc", "is not a sha256 digest"),
    ("md5:" + "z" * 32, "is not a md5 digest"),
])
def test_bad_checksum_specs_say_what_to_write(spec, message):
    with pytest.raises(FetchError, match=message) as info:
        parse_checksum(spec)
    assert "data_checksum" in str(info.value)


def test_official_url_has_its_checksum_built_in(tmp_path):
    assert expected_checksum(config_for(tmp_path, OFFICIAL_URL)) == ("sha256", OFFICIAL_SHA256)
    assert expected_checksum(config_for(tmp_path, "file:///x.zip")) is None


# --- local sources and the cache -----------------------------------------------------------
@pytest.mark.parametrize("as_url", [False, True])
def test_local_file_is_copied_verified_and_cached(tmp_path, source, as_url):
    url = source.as_uri() if as_url else str(source)
    target = fetch(config_for(tmp_path, url, "sha256:" + sha256(PAYLOAD)))
    assert target.read_bytes() == PAYLOAD
    source.unlink()  # a rerun must not need the source any more
    assert fetch(config_for(tmp_path, url, "sha256:" + sha256(PAYLOAD))) == target
    assert leftovers(tmp_path) == [target.name]


def test_md5_checksum_is_accepted(tmp_path, source):
    assert fetch(config_for(tmp_path, source, "md5:" + hashlib.md5(PAYLOAD).hexdigest())).is_file()


def test_checksum_mismatch_names_both_values_and_leaves_nothing(tmp_path, source):
    wrong = "0" * 64
    with pytest.raises(FetchError) as info:
        fetch(config_for(tmp_path, source, wrong))
    message = str(info.value)
    assert f"expected sha256:{wrong}" in message and f"got sha256:{sha256(PAYLOAD)}" in message
    assert str(source) in message and "data_checksum" in message
    assert leftovers(tmp_path) == []  # neither a cached file nor a partial one


def test_cache_is_keyed_by_url_and_checksum(tmp_path, source):
    plain = fetch(config_for(tmp_path, source))
    checked = fetch(config_for(tmp_path, source, sha256(PAYLOAD)))
    other_url = fetch(config_for(tmp_path, source.as_uri()))
    assert len({plain, checked, other_url}) == 3


def test_a_damaged_cached_file_is_fetched_again(tmp_path, source):
    config = config_for(tmp_path, source, sha256(PAYLOAD))
    target = fetch(config)
    target.write_bytes(b"bit rot")
    assert fetch(config).read_bytes() == PAYLOAD


def test_partial_files_are_never_taken_as_the_dataset(tmp_path, source):
    config = config_for(tmp_path, source)
    folder = fetch(config).parent
    target = fetch(config)
    target.unlink()
    (folder / ".partial-abc").write_bytes(PAYLOAD[:10])  # left by a killed run
    assert fetch(config).read_bytes() == PAYLOAD


def test_missing_file_and_unknown_scheme_say_what_to_do(tmp_path):
    with pytest.raises(FetchError, match=r"no such file: .*nope\.zip.*file:///abs/path\.zip"):
        fetch(config_for(tmp_path, tmp_path / "nope.zip"))
    for url in ("ftp://host/x.zip", "gopher://host/x.zip", "jar:file:///x.zip!/a"):
        scheme = url.split(":", 1)[0]
        with pytest.raises(ValueError, match=rf"has the scheme '{scheme}'; use http\(s\)://, s3://, file:// or a"):
            fetch(config_for(tmp_path, url))
    assert leftovers(tmp_path) == []


# --- local files only under the data roots -------------------------------------------------
def test_local_files_outside_the_data_roots_are_refused_before_anything_is_read(tmp_path, source):
    """Whoever triggers a run chooses data_url: a local file is read only under a configured root."""
    outside = tmp_path / "elsewhere" / "secret.zip"
    outside.parent.mkdir()
    outside.write_bytes(PAYLOAD)
    link = source.parent / "link.zip"  # inside the root, pointing outside it
    link.symlink_to(outside)
    roots = {"data_roots": str(source.parent)}
    for url in (outside.as_uri(), str(outside), str(link), link.as_uri(), f"{source.parent}/../elsewhere/secret.zip",
                "file:///etc/passwd"):
        config = config_for(tmp_path, url).replace(**roots)
        with pytest.raises(ValueError, match=rf"outside the data roots \({source.parent}\)\. Put the archive in one "
                                             r"of them, or add its folder to CIFAR10_DATA_ROOTS"):
            fetch(config)
    with pytest.raises(ValueError, match=r"names the host 'etc'; a file URL is local: file:///absolute/path\.zip"):
        fetch(config_for(tmp_path, "file://etc/passwd").replace(**roots))
    assert leftovers(tmp_path) == []
    assert fetch(config_for(tmp_path, source.as_uri()).replace(**roots)).read_bytes() == PAYLOAD


def test_without_data_roots_only_the_state_folders_data_is_readable(tmp_path, source):
    config = load_config({"state_dir": str(tmp_path / "state"), "data_url": source.as_uri()}, environ={})
    assert config.data_root_paths == (tmp_path / "state" / "data",)
    with pytest.raises(ValueError, match=r"outside the data roots"):
        fetch(config)
    inside = tmp_path / "state" / "data" / "mine.zip"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(PAYLOAD)
    assert fetch(config.replace(data_url=inside.as_uri())).read_bytes() == PAYLOAD
    several = load_config({"data_roots": f"{tmp_path / 'a'}:{tmp_path / 'b'}"}, environ={})
    assert several.data_root_paths == (tmp_path / "a", tmp_path / "b")


# --- http:// against a local server ----------------------------------------------------
class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/truncated.zip":  # promise more bytes than are sent, then hang up
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:1000])
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def http_base(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "data.zip").write_bytes(PAYLOAD)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_download_logs_progress_and_verifies(tmp_path, http_base, monkeypatch, caplog):
    monkeypatch.setattr(fetch_module, "PROGRESS_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="training.data.fetch")
    target = fetch(config_for(tmp_path, f"{http_base}/data.zip", sha256(PAYLOAD)))
    assert target.read_bytes() == PAYLOAD
    progress = [r.getMessage() for r in caplog.records if "bytes of" in r.getMessage()]
    assert progress and progress[-1].endswith("MB/s") and "(100%)" in progress[-1]
    assert f"{len(PAYLOAD)} bytes" in progress[-1]


def test_http_not_found_names_the_url(tmp_path, http_base):
    with pytest.raises(FetchError, match=rf"cannot download {http_base}/missing\.zip: HTTP Error 404.*Check the URL"):
        fetch(config_for(tmp_path, f"{http_base}/missing.zip"))


def test_http_truncated_download_fails_and_leaves_nothing(tmp_path, http_base):
    with pytest.raises(FetchError, match=rf"{http_base}/truncated\.zip .*rerun the task to retry"):
        fetch(config_for(tmp_path, f"{http_base}/truncated.zip"))
    assert leftovers(tmp_path) == []


# --- s3:// against a real S3 server (SeaweedFS) ------------------------------------------
@pytest.fixture
def s3_env(s3_bucket, monkeypatch):
    """The standard AWS variables only, pointing at the test server: fetch.py passes no endpoint."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_bucket.env.items():
        monkeypatch.setenv(name, value)
    return s3_bucket


def test_s3_download_uses_the_standard_endpoint_variable(tmp_path, s3_env):
    s3_client(s3_env.endpoint).put_object(Bucket=s3_env.name, Key="cifar/data.zip", Body=PAYLOAD)
    target = fetch(config_for(tmp_path, s3_env.url("cifar/data.zip"), sha256(PAYLOAD)))
    assert target.read_bytes() == PAYLOAD and target.name.endswith("data.zip")


def test_s3_missing_key_names_the_key_the_bucket_and_the_endpoint_setting(tmp_path, s3_env):
    with pytest.raises(FetchError) as info:
        fetch(config_for(tmp_path, s3_env.url("nope.zip")))
    assert str(info.value) == (
        f"cannot read s3://{s3_env.name}/nope.zip: no object 'nope.zip' in bucket '{s3_env.name}' at "
        f"{s3_env.endpoint} (from AWS_ENDPOINT_URL_S3): check the key in the URL "
        f"(s3://{s3_env.name}/nope.zip) or upload the object first")
    assert leftovers(tmp_path) == []


def test_s3_missing_bucket_says_to_create_it(tmp_path, s3_env):
    with pytest.raises(FetchError, match=rf"bucket 'no-such-bucket' does not exist at {s3_env.endpoint} "
                                         r"\(from AWS_ENDPOINT_URL_S3\): create it .*or fix the bucket in the URL"):
        fetch(config_for(tmp_path, "s3://no-such-bucket/data.zip"))


@pytest.mark.parametrize("variable", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_s3_refused_credentials_name_the_variables(tmp_path, s3_env, monkeypatch, variable):
    monkeypatch.setenv(variable, "wrong")
    with pytest.raises(FetchError) as info:
        fetch(config_for(tmp_path, s3_env.url("data.zip")))
    message = str(info.value)
    assert f"{s3_env.endpoint} (from AWS_ENDPOINT_URL_S3) refused the credentials for bucket" in message
    assert "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message
    assert "wrong" not in message  # never the credentials themselves


def test_s3_without_credentials_says_which_variables_to_set(tmp_path, s3_env, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to look for here
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(FetchError, match=r"no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        fetch(config_for(tmp_path, s3_env.url("data.zip")))


@pytest.mark.parametrize("variable, host", [("AWS_ENDPOINT_URL_S3", "127.0.0.1"),
                                            ("AWS_ENDPOINT_URL", "no-such-host.invalid")])
def test_s3_unreachable_endpoint_fails_in_seconds_naming_the_setting(tmp_path, s3_env, monkeypatch, variable, host):
    """A closed port (connection refused) or an unknown host (DNS), from either endpoint variable."""
    import time

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    endpoint = f"http://{host}:{free_port()}"
    monkeypatch.setenv(variable, endpoint)
    start = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetch(config_for(tmp_path, s3_env.url("data.zip")))
    assert time.monotonic() - start < 15  # botocore's default retries take far longer
    assert f"cannot reach the S3 endpoint {endpoint} (from {variable})" in str(info.value)
    assert "Check that the store is running" in str(info.value)


def test_s3_url_without_key_is_refused(tmp_path):
    with pytest.raises(FetchError, match=r"s3://datasets is not an S3 object URL; write s3://bucket/"):
        fetch(config_for(tmp_path, "s3://datasets"))


def test_unreachable_host_says_how_to_use_a_local_archive(tmp_path):
    """What `make run` shows when the default (official) URL cannot be reached."""
    url = f"http://127.0.0.1:{free_port()}/cifar-10-binary.tar.gz"  # nothing listens there
    with pytest.raises(FetchError, match=r"cannot download .*DATA_URL=file:///.*make run"):
        fetch(config_for(tmp_path, url))
