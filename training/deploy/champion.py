"""The served model as the registry names it: which Bento serves ``champion``, and rollback.

The champion's Bento is recorded on its model version (tag ``bento_tag``) when it is promoted,
so serving starts what the registry says rather than the newest Bento in the store, which may
be one that failed the served-artifact check.

CLI (the Makefile's ``serve`` and ``rollback`` targets)::

    python -m training.deploy.champion bento          # the champion's Bento tag
    python -m training.deploy.champion show           # the champion and its recorded move
    python -m training.deploy.champion rollback [--to VERSION] [--reason TEXT]
"""

from __future__ import annotations

import argparse
import getpass
import logging
import socket
import sys
from dataclasses import dataclass

from training.config import PipelineConfig

log = logging.getLogger(__name__)


class NoChampion(RuntimeError):
    """The registry has no champion (or no version to roll back to)."""


@dataclass(frozen=True)
class Rollback:
    version: str
    previous: str
    bento_tag: str
    rebuilt: bool
    image: str | None


def operator() -> str:
    """Who moves the alias from a shell: user@host."""
    return f"cli:{getpass.getuser()}@{socket.gethostname()}"


def champion_bento(config: PipelineConfig) -> str:
    """The Bento tag of the champion, present in this machine's store; raises :class:`NoChampion` otherwise."""
    from training.packaging.bento import bento_of_run, use_bentoml_home
    from training.registry.promotion import client_for, current_champion

    mv = current_champion(client_for(config), config.registered_model_name)
    if mv is None:
        raise NoChampion(f"no {config.registered_model_name} version holds the champion alias yet: run the "
                         "pipeline (make pipeline) first")
    tag = mv.tags.get("bento_tag")
    bentoml = use_bentoml_home(config)
    if tag:
        try:
            return str(bentoml.bentos.get(tag).tag)
        except bentoml.exceptions.NotFound:
            pass
    found = bento_of_run(config, mv.run_id)
    if found is None:
        raise NoChampion(f"the champion ({config.registered_model_name} version {mv.version}) has no Bento in "
                         f"{config.bentoml_home_path}: `make rollback VERSION={mv.version}` rebuilds it")
    return found


def ensure_bento(config: PipelineConfig, version_uri: str) -> tuple[str, bool]:
    """The Bento of ``version_uri``, rebuilt when the store lost it; returns (tag, rebuilt)."""
    from training.packaging.bento import bento_of_run, build_bento, import_version, use_bentoml_home
    from training.registry.promotion import client_for, split_uri

    name, version = split_uri(version_uri)
    mv = client_for(config).get_model_version(name, version)
    bentoml = use_bentoml_home(config)
    tag = mv.tags.get("bento_tag")
    if tag:
        try:
            return str(bentoml.bentos.get(tag).tag), False
        except bentoml.exceptions.NotFound:
            log.info("Bento %s of version %s is gone from the store: rebuilding it", tag, version)
    found = bento_of_run(config, mv.run_id)
    if found:
        return found, False
    return build_bento(config, import_version(config, version_uri)), True


def promote_checked(config: PipelineConfig, version_uri: str, bento_tag: str, by: str) -> str:
    """The DAG's last gate step: ``champion`` moves to the checked version, its image becomes ``latest``."""
    from training.packaging import container
    from training.registry.promotion import promote

    promote(config, version_uri, bento_tag, by=by)
    container.tag_image(config, bento_tag, "latest")
    return version_uri


def rollback(config: PipelineConfig, to_version: str | int | None = None, reason: str = "",
             by: str | None = None) -> Rollback:
    """Move ``champion`` to ``to_version`` (default: the previous champion) and make its Bento the served one.

    The Bento is rebuilt only when the store lost it; the image, when one exists for it, is
    tagged ``latest``; with ``bento_export_uri`` set the Bento is published again, so serving
    machines importing the newest one get it.
    """
    from training.packaging import container
    from training.packaging.publish import publish_bento
    from training.registry.promotion import client_for, current_champion, previous_champion, promote

    client = client_for(config)
    name = config.registered_model_name
    current = current_champion(client, name)
    current_version = str(current.version) if current else None
    if to_version in (None, ""):
        target = previous_champion(client, name, current_version)
        if target is None:
            raise NoChampion(f"{name} has no earlier champion than version {current_version or '(none)'} to roll "
                             "back to; name a version (VERSION=N, --to N)")
        to_version = str(target.version)
    to_version = str(to_version)
    if to_version == current_version:
        raise NoChampion(f"version {to_version} is already the champion")
    uri = f"models:/{name}/{to_version}"
    bento_tag, rebuilt = ensure_bento(config, uri)
    why = reason or f"rollback from version {current_version or '(none)'}"
    promote(config, uri, bento_tag, by=by or operator(), action="rollback", reason=why)
    image = container.tag_image(config, bento_tag, "latest")
    if config.bento_export_uri:
        log.info("published %s to %s", bento_tag, publish_bento(config, bento_tag))
    log.info("champion is now version %s (was %s), served from Bento %s%s", to_version, current_version,
             bento_tag, " (rebuilt)" if rebuilt else "")
    return Rollback(to_version, current_version or "", bento_tag, rebuilt, image)


def main(argv: list[str] | None = None) -> int:
    from training.config import load_config
    from training.registry.promotion import champion_record, dumps

    parser = argparse.ArgumentParser(prog="python -m training.deploy.champion", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bento", help="print the champion's Bento tag")
    sub.add_parser("show", help="print the champion and its recorded move as JSON")
    back = sub.add_parser("rollback", help="move champion to the previous champion (or --to VERSION)")
    back.add_argument("--to", default=None, help="model version to move champion to (default: the previous one)")
    back.add_argument("--reason", default="", help="why (recorded on the version and in MLflow)")
    args = parser.parse_args(argv)
    # Progress on stderr: `bento` prints only the tag on stdout, for $(...) in make.
    logging.basicConfig(level=logging.INFO if args.command == "rollback" else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    config = load_config()
    try:
        if args.command == "bento":
            print(champion_bento(config))
        elif args.command == "show":
            print(dumps(champion_record(config)))
        else:
            done = rollback(config, args.to, args.reason)
            print(f"champion: version {done.previous or '-'} -> {done.version}; Bento {done.bento_tag}"
                  f"{' (rebuilt)' if done.rebuilt else ''}{f'; image {done.image}' if done.image else ''}")
    except NoChampion as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
