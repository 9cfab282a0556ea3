"""publish_bento: nothing without a URI; with one, the store's export to that URI."""

from __future__ import annotations

from training.config import PipelineConfig
from training.packaging import bento_store
from training.packaging.publish import publish_bento


def test_no_export_uri_publishes_nothing(monkeypatch):
    def fail(*args):
        raise AssertionError("exported although bento_export_uri is empty")

    monkeypatch.setattr(bento_store, "export_bento", fail)
    assert publish_bento(PipelineConfig(), "cifar10-classifier:abc") == ""


def test_export_uri_exports_the_built_bento_there(monkeypatch):
    calls = []

    def export(config, tag, uri):
        calls.append((tag, uri))
        return f"{uri}cifar10-classifier-abc.bento"

    monkeypatch.setattr(bento_store, "export_bento", export)
    config = PipelineConfig(bento_export_uri="s3://cifar10/bentos/")
    assert publish_bento(config, "cifar10-classifier:abc") == "s3://cifar10/bentos/cifar10-classifier-abc.bento"
    assert calls == [("cifar10-classifier:abc", "s3://cifar10/bentos/")]
