"""Move Bentos and BentoML models between a local store and S3, so the image can be built, or the
Bento served, on another machine (endpoint and credentials from the environment, as
:mod:`training.storage` reads them).

Serving imports exactly the champion's Bento (:func:`import_champion`): the archive that publish
recorded on the version holding ``champion``, refused when its sha256 differs. Nothing picks the newest
archive in the bucket: whoever can write to the bucket does not choose what the server runs.

    python -m training.packaging.bento_store export cifar10-classifier:latest s3://bucket/bentos/
    python -m training.packaging.bento_store import      # the champion's Bento, its sha256 checked
    python -m training.packaging.bento_store export-model cifar10-cnn:latest s3://bucket/models/
    python -m training.packaging.bento_store import-model s3://bucket/models/cifar10-cnn-<version>.bentomodel \
        [--sha256 HEX]

Exit status 2: refused or failed, with what to fix; 3: nothing to import yet.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from training import storage
from training.config import PipelineConfig, load_config
from training.data.fetch import file_digest

log = logging.getLogger(__name__)

BENTO_SUFFIX = ".bento"
MODEL_SUFFIX = ".bentomodel"


@dataclass(frozen=True)
class Archive:
    """An exported archive in S3 and the sha256 of its bytes."""

    uri: str
    sha256: str


class ArchiveRefused(RuntimeError):
    """The archive in S3 is not the one the registry recorded: it is not served."""


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


def _export(item, exporter, uri: str, suffix: str) -> Archive:
    """Write ``item`` (a Bento or model) with ``exporter`` to a temporary archive and upload it; return the archive."""
    bucket, key = _target_key(uri, item.tag, suffix)
    storage.check_bucket(bucket)  # before the export, which takes a while for a large Bento
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(exporter(item.tag, str(Path(tmp) / f"archive{suffix}")))
        digest = file_digest(archive, "sha256")
        with storage.explained(bucket, key):
            storage.client().upload_file(str(archive), bucket, key)
    log.info("exported %s to s3://%s/%s (sha256 %s)", item.tag, bucket, key, digest)
    return Archive(f"s3://{bucket}/{key}", digest)


def _import(bentoml, importer, uri: str, suffix: str, sha256: str = "") -> str:
    """Download the archive at ``uri`` (its full key), refuse it unless its sha256 is ``sha256`` (when given),
    import it with ``importer``; return the tag. Importing what the store already holds is not an error.
    """
    bucket, key = _split(uri)
    if not key.endswith(suffix):
        raise ValueError(f"{uri} is not a *{suffix} archive: name its full key, s3://bucket/path/name{suffix}")
    storage.check_bucket(bucket)  # a missing bucket, not "no such key"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / f"archive{suffix}"
        with storage.explained(bucket, key):
            storage.client().download_file(bucket, key, str(local))
        got = file_digest(local, "sha256")
        if sha256 and got != sha256.lower():
            raise ArchiveRefused(f"refusing {uri}: its sha256 is {got}, not the {sha256} on record; the object was "
                                 "replaced after it was published. Nothing was imported: find out what wrote to the "
                                 "bucket, then publish the Bento again")
        try:
            tag = str(importer(str(local)).tag)
        except bentoml.exceptions.BentoMLException as exc:
            tag = _existing_tag(exc)
    log.info("imported %s from %s (sha256 %s)", tag, uri, got)
    return tag


def export_bento(config: PipelineConfig, bento_tag: str, uri: str) -> Archive:
    """Export Bento ``bento_tag`` (models included) to ``uri`` (an S3 prefix or key); return the archive."""
    from training.packaging.bento import use_bentoml_home

    bentoml = use_bentoml_home(config)
    return _export(bentoml.get(bento_tag), bentoml.export_bento, uri, BENTO_SUFFIX)


def import_champion(config: PipelineConfig, alias: str = "champion") -> str:
    """Import the champion's (or the version ``alias`` names) Bento: the archive publish recorded on its version,
    only if its sha256 matches.

    Raises :class:`training.registry.promotion.NotPublished` when there is nothing to import yet and
    :class:`ArchiveRefused` when the archive is not the one on record. Returns the Bento tag.
    """
    from training.packaging.bento import use_bentoml_home
    from training.registry.promotion import published_champion

    published = published_champion(config, alias)
    bentoml = use_bentoml_home(config)
    tag = _import(bentoml, bentoml.import_bento, published.uri, BENTO_SUFFIX, published.sha256)
    if tag != published.bento_tag:
        raise ArchiveRefused(f"{published.uri} holds the Bento {tag}, but the {alias} ({published.model} version "
                             f"{published.version}) is served from {published.bento_tag}: publish its Bento again")
    return tag


def export_model(config: PipelineConfig, model_tag: str, uri: str) -> Archive:
    """Export BentoML model ``model_tag`` to ``uri`` (an S3 prefix or key); return the archive."""
    from training.packaging.bento import use_bentoml_home

    bentoml = use_bentoml_home(config)
    return _export(bentoml.models.get(model_tag), bentoml.models.export_model, uri, MODEL_SUFFIX)


def import_model(config: PipelineConfig, uri: str, sha256: str = "") -> str:
    """Import the BentoML model archive at ``uri`` (its full key), checked against ``sha256`` when given."""
    from training.packaging.bento import use_bentoml_home

    bentoml = use_bentoml_home(config)
    return _import(bentoml, bentoml.models.import_model, uri, MODEL_SUFFIX, sha256)


def publish_bento(config: PipelineConfig, version_uri: str, bento_tag: str) -> str:
    """Export ``bento_tag`` to ``config.bento_export_uri`` and record the archive (URI, sha256) on model version
    ``version_uri``, where :func:`import_champion` finds it; return its URI ("" without an export URI).

    Safe to repeat: the archive and its record are rewritten.
    """
    if not config.bento_export_uri:
        return ""
    from training.registry.promotion import record_published

    archive = export_bento(config, bento_tag, config.bento_export_uri)
    record_published(config, version_uri, archive.uri, archive.sha256)
    return archive.uri


def _existing_tag(exc: Exception) -> str:
    """The tag in BentoML's "Item 'name:version' already exists" error; re-raise any other error."""
    found = re.search(r"Item '([^']+)' already exists", str(exc))
    if found is None:
        raise exc
    return found.group(1)


def main(argv: list[str] | None = None) -> int:
    from training.registry.promotion import NotPublished
    from training.registry.tracking import TrackingServerUnreachable

    parser = argparse.ArgumentParser(prog="python -m training.packaging.bento_store",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("export", "Bento tag -> S3"), ("export-model", "BentoML model tag -> S3")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("tag")
        p.add_argument("uri", help="s3://bucket/prefix/ (archive named <name>-<version>) or a full key")
    p = sub.add_parser("import", help="the champion's Bento, as the registry records it -> Bento store")
    p.add_argument("--alias", default="champion", choices=("champion", "challenger"), help="whose Bento")
    p = sub.add_parser("import-model", help="S3 -> model store")
    p.add_argument("uri", help=f"s3://bucket/key{MODEL_SUFFIX}")
    p.add_argument("--sha256", default="", help="refuse the archive unless its sha256 is this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config()
    try:
        if args.command == "export":
            print(export_bento(config, args.tag, args.uri).uri)
        elif args.command == "export-model":
            print(export_model(config, args.tag, args.uri).uri)
        elif args.command == "import":
            print(import_champion(config, args.alias))
        else:
            print(import_model(config, args.uri, args.sha256))
    except NotPublished as exc:
        print(f"{parser.prog} {args.command}: nothing to import yet: {exc}", file=sys.stderr)
        return 3
    # Each says what to fix: no traceback.
    except (storage.StorageError, ArchiveRefused, TrackingServerUnreachable, FileNotFoundError, ValueError) as exc:
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
