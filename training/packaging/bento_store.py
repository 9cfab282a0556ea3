"""Move BentoML models and Bentos between a local store and S3, so the image can be
built, or the Bento served, on another machine.

``bentoml.export_bento``/``bentoml.models.export_model`` write one archive (a Bento
archive holds its models too); it goes to S3 through :mod:`training.storage`, whose
endpoint and credentials come from the environment only: the standard ``AWS_*``
variables (``AWS_ENDPOINT_URL_S3`` for MinIO, SeaweedFS and other S3-compatible
stores), an instance role, or a profile. Nothing here logs them. The bucket is checked
before the archive is written, so a wrong endpoint, bucket or credentials fail in
seconds with a :class:`training.storage.StorageError` that says what to fix.

CLI (the store is ``BENTOML_HOME``, or the pipeline's ``state_dir/bentoml``)::

    python -m training.packaging.bento_store export cifar10-classifier:latest s3://bucket/bentos/
    python -m training.packaging.bento_store import s3://bucket/bentos/            # newest .bento there
    python -m training.packaging.bento_store export-model cifar10-cnn:latest s3://bucket/models/
    python -m training.packaging.bento_store import-model s3://bucket/models/cifar10-cnn-<version>.bentomodel
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from training import storage
from training.config import PipelineConfig, load_config

log = logging.getLogger(__name__)

BENTO_SUFFIX = ".bento"
MODEL_SUFFIX = ".bentomodel"


def _split(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an S3 URI: {uri!r}; write s3://bucket/prefix/ or s3://bucket/key{BENTO_SUFFIX}")
    return parts.netloc, parts.path.lstrip("/")


def _target_key(uri: str, tag, suffix: str) -> tuple[str, str]:
    """``s3://b/prefix/`` -> (b, prefix/<name>-<version><suffix>); a full key is kept."""
    bucket, key = _split(uri)
    if not key or key.endswith("/"):
        key = f"{key}{tag.name}-{tag.version}{suffix}"
    return bucket, key


def _resolve_key(client, uri: str, suffix: str) -> tuple[str, str]:
    """A key ending in ``suffix`` is taken as is; a prefix means the newest such object under it."""
    bucket, key = _split(uri)
    if key.endswith(suffix):
        return bucket, key
    newest = None
    with storage.explained(bucket, key):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith(suffix) and (newest is None or obj["LastModified"] > newest["LastModified"]):
                    newest = obj
    if newest is None:
        raise FileNotFoundError(f"no *{suffix} object under {uri}; export one first "
                                f"(python -m training.packaging.bento_store export ...)")
    return bucket, newest["Key"]


def _export(item, exporter, uri: str, suffix: str) -> str:
    """Write ``item`` (a Bento or model) with ``exporter`` to a temporary archive and upload it."""
    bucket, key = _target_key(uri, item.tag, suffix)
    storage.check_bucket(bucket)  # before the export, which takes a while for a large Bento
    with tempfile.TemporaryDirectory() as tmp:
        archive = exporter(item.tag, str(Path(tmp) / f"archive{suffix}"))
        with storage.explained(bucket, key):
            storage.client().upload_file(archive, bucket, key)
    log.info("exported %s to s3://%s/%s", item.tag, bucket, key)
    return f"s3://{bucket}/{key}"


def _import(bentoml, importer, uri: str, suffix: str) -> str:
    """Download the archive at ``uri`` (or the newest under it), import it with ``importer``; return the tag.

    Importing what the store already holds is not an error: its tag is returned.
    """
    client = storage.client()
    storage.check_bucket(_split(uri)[0])  # a missing bucket, not "no archive under it"
    bucket, key = _resolve_key(client, uri, suffix)
    with tempfile.TemporaryDirectory() as tmp:
        local = str(Path(tmp) / f"archive{suffix}")
        with storage.explained(bucket, key):
            client.download_file(bucket, key, local)
        try:
            tag = str(importer(local).tag)
        except bentoml.exceptions.BentoMLException as exc:
            tag = _existing_tag(exc)
    log.info("imported %s from s3://%s/%s", tag, bucket, key)
    return tag


def export_bento(config: PipelineConfig, bento_tag: str, uri: str) -> str:
    """Export Bento ``bento_tag`` (models included) to ``uri`` (an S3 prefix or key); return the S3 URI."""
    from training.packaging.bento import use_bentoml_home

    bentoml = use_bentoml_home(config)
    return _export(bentoml.get(bento_tag), bentoml.export_bento, uri, BENTO_SUFFIX)


def import_bento(config: PipelineConfig, uri: str) -> str:
    """Import a Bento archive from ``uri`` (a key, or the newest under a prefix); return its tag."""
    from training.packaging.bento import use_bentoml_home

    bentoml = use_bentoml_home(config)
    return _import(bentoml, bentoml.import_bento, uri, BENTO_SUFFIX)


def export_model(config: PipelineConfig, model_tag: str, uri: str) -> str:
    """Export BentoML model ``model_tag`` to ``uri`` (an S3 prefix or key); return the S3 URI."""
    from training.packaging.bento import use_bentoml_home

    bentoml = use_bentoml_home(config)
    return _export(bentoml.models.get(model_tag), bentoml.models.export_model, uri, MODEL_SUFFIX)


def import_model(config: PipelineConfig, uri: str) -> str:
    """Import a BentoML model archive from ``uri`` (a key, or the newest under a prefix); return its tag."""
    from training.packaging.bento import use_bentoml_home

    bentoml = use_bentoml_home(config)
    return _import(bentoml, bentoml.models.import_model, uri, MODEL_SUFFIX)


def _existing_tag(exc: Exception) -> str:
    """The tag in BentoML's "Item 'name:version' already exists" error; re-raise any other error."""
    found = re.search(r"Item '([^']+)' already exists", str(exc))
    if found is None:
        raise exc
    return found.group(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.packaging.bento_store", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("export", "Bento tag -> S3"), ("export-model", "BentoML model tag -> S3")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("tag")
        p.add_argument("uri", help="s3://bucket/prefix/ (archive named <name>-<version>) or a full key")
    for name, help_text in [("import", "S3 -> Bento store"), ("import-model", "S3 -> model store")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("uri", help="s3://bucket/key, or a prefix: its newest archive")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config()
    try:
        if args.command == "export":
            print(export_bento(config, args.tag, args.uri))
        elif args.command == "export-model":
            print(export_model(config, args.tag, args.uri))
        elif args.command == "import":
            print(import_bento(config, args.uri))
        else:
            print(import_model(config, args.uri))
    except (storage.StorageError, FileNotFoundError, ValueError) as exc:  # each says what to fix: no traceback
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
