"""bento_store.publish_bento: nothing without a URI; with one, the store's export there, recorded (URI and
sha256) on the version, which is what serving later imports and checks."""

from __future__ import annotations

import pytest
from tests.helpers import registry_client

from training.config import PipelineConfig, load_config
from training.packaging import bento_store
from training.registry.promotion import NotPublished, published_champion


def _version(config) -> str:
    """A registered version of ``config``'s model (its model files do not matter here)."""
    client = registry_client(config)
    client.create_registered_model(config.registered_model_name)
    version = client.create_model_version(config.registered_model_name, source="s3://nowhere/model").version
    return f"models:/{config.registered_model_name}/{version}"


def test_no_export_uri_publishes_nothing(monkeypatch):
    def fail(*args):
        raise AssertionError("exported although bento_export_uri is empty")

    monkeypatch.setattr(bento_store, "export_bento", fail)
    assert bento_store.publish_bento(PipelineConfig(), "models:/cifar10-cnn/1", "cifar10-classifier:abc") == ""


def test_export_uri_exports_the_built_bento_and_records_the_archive_on_the_version(monkeypatch, store):
    calls = []

    def export(config, tag, uri):
        calls.append((tag, uri))
        return bento_store.Archive(f"{uri}cifar10-classifier-abc.bento", "ab" * 32)

    monkeypatch.setattr(bento_store, "export_bento", export)
    config = load_config({**store, "bento_export_uri": "s3://cifar10/bentos/"}, environ={})
    uri = _version(config)
    assert bento_store.publish_bento(config, uri, "cifar10-classifier:abc") == "s3://cifar10/bentos/cifar10-classifier-abc.bento"
    assert calls == [("cifar10-classifier:abc", "s3://cifar10/bentos/")]
    tags = registry_client(config).get_model_version(config.registered_model_name, "1").tags
    assert tags["bento_archive_uri"] == "s3://cifar10/bentos/cifar10-classifier-abc.bento"
    assert tags["bento_archive_sha256"] == "ab" * 32


def test_serving_has_nothing_to_import_without_a_champion_or_its_published_archive(monkeypatch, store):
    config = load_config(store, environ={})
    with pytest.raises(NotPublished, match="no .* version holds the champion alias yet: run the pipeline first"):
        published_champion(config)
    uri = _version(config)
    client = registry_client(config)
    client.set_registered_model_alias(config.registered_model_name, "champion", "1")
    client.set_model_version_tag(config.registered_model_name, "1", "bento_tag", "cifar10-classifier:abc")
    with pytest.raises(NotPublished, match=r"the champion \(.* version 1\) has no published Bento on record .*"
                                           r"rerun that task with CIFAR10_BENTO_EXPORT_URI set"):
        published_champion(config)
    monkeypatch.setattr(bento_store, "export_bento",
                        lambda config, tag, uri: bento_store.Archive(f"{uri}x.bento", "cd" * 32))
    bento_store.publish_bento(config.replace(bento_export_uri="s3://cifar10/bentos/"), uri, "cifar10-classifier:abc")
    published = published_champion(config)
    assert (published.version, published.bento_tag, published.uri, published.sha256) == (
        "1", "cifar10-classifier:abc", "s3://cifar10/bentos/x.bento", "cd" * 32)
