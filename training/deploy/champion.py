"""The served model as the registry names it: which Bento serves ``champion``, promotion and rollback.

The champion's Bento is recorded on its model version (tag ``bento_tag``) when it is promoted,
so serving starts what the registry says rather than the newest Bento in the store, which may
be one that failed the served-artifact check.

Where a front door follows the aliases (its heartbeat on the registered model is fresh), :func:`promote`
names the version ``challenger`` instead, and the follower's shadow ends in :func:`conclude_shadow`, which
moves ``champion`` only if the challenger passed (training/deploy/shadow.py).

:func:`promote` (the DAG's step after ``verify``) and :func:`rollback` both write their records
first (the version's tags, the ``<experiment>-champion`` run, the image tagged ``latest``) and move
the alias last, and only if the champion is still the one they started from. A promotion that is
retried after any partial failure finishes the step. A rollback goes only to a version that was
promoted (passed both gates) unless it is forced with a reason, and stops, moving nothing, when the
champion changed while it worked (e.g. while it rebuilt a Bento).

CLI (the Makefile's ``serve`` and ``rollback`` targets)::

    python -m training.deploy.champion bento          # the champion's Bento tag
    python -m training.deploy.champion show           # the champion and its recorded move
    python -m training.deploy.champion rollback [--to VERSION] [--reason TEXT] [--force]
"""

from __future__ import annotations

import argparse
import getpass
import logging
import socket
import sys
import time
from dataclasses import dataclass

from training.config import PipelineConfig

log = logging.getLogger(__name__)


class NoChampion(RuntimeError):
    """The registry has no champion (or no version to roll back to)."""


class RollbackRefused(RuntimeError):
    """The version asked for did not pass the gates, and the rollback was not forced with a reason."""


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
    from training.registry.promotion import client_for, current_champion

    mv = current_champion(client_for(config), config.registered_model_name)
    if mv is None:
        raise NoChampion(f"no {config.registered_model_name} version holds the champion alias yet: run the "
                         "pipeline (make pipeline) first")
    return version_bento(config, mv)


def version_bento(config: PipelineConfig, mv) -> str:
    """The Bento tag of model version ``mv``, present in this machine's store; raises :class:`NoChampion` otherwise."""
    from training.packaging.bento import bento_of_run, use_bentoml_home

    tag = mv.tags.get("bento_tag")
    bentoml = use_bentoml_home(config)
    if tag:
        try:
            return str(bentoml.bentos.get(tag).tag)
        except bentoml.exceptions.NotFound:
            pass
    found = bento_of_run(config, mv.run_id)
    if found is None:
        raise NoChampion(f"{config.registered_model_name} version {mv.version} has no Bento in "
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


def _record(config: PipelineConfig, client, move) -> tuple[str, str | None]:
    """Everything a move leaves before the alias moves: the registry's records, then the image tagged ``latest``.

    Returns the id of the move's run in the champion experiment and the image tag (None without an image).
    """
    from training.packaging import container
    from training.registry.promotion import record_move

    run_id = record_move(client, config, move)
    return run_id, container.tag_image(config, move.bento_tag, "latest")


def promote(config: PipelineConfig, version_uri: str, bento_tag: str, *, by: str) -> str:
    """The DAG's step after ``verify``: ``champion`` moves to the checked version, records first; return the URI.

    Fails when the champion changed after the version was scored against it (the comparison is
    then stale) unless ``force_promote`` is set. Idempotent: when an earlier try of this step
    (the same ``by``) already moved the alias, its records came first, so the step is complete.
    """
    from training.registry.promotion import (Move, champion_version, client_for, front_door_watching, mark_promoted,
                                             move_alias, split_uri)

    name, version = split_uri(version_uri)
    client = client_for(config)
    mv = client.get_model_version(name, version)
    before = champion_version(client, name)
    if before == version:
        if mv.tags.get("champion_by") != by:
            log.warning("%s version %s is the champion already, moved there by %s, not by %s: nothing to do", name,
                        version, mv.tags.get("champion_by") or "an unrecorded move", by)
        else:
            log.info("%s version %s is the champion already: an earlier try of this step moved it, after its "
                     "records; nothing is left to do", name, version)
        return version_uri
    scored = mv.tags.get("gate_champion_version", "")
    if not config.force_promote and before != scored:
        raise RuntimeError(f"the champion moved to version {before or 'none'} after version {version} was scored "
                           f"against version {scored or 'none'}: the comparison is stale; rerun this DAG run to score "
                           "it against the current champion")
    move = Move(name, version, mv.run_id, "promote", before, bento_tag, mv.tags.get("gate_reason", ""), by)
    if before and config.shadow_share > 0 and front_door_watching(client, name, time.time()):
        return _name_challenger(config, client, move, version_uri)
    mark_promoted(client, move)
    run_id, _ = _record(config, client, move)
    move_alias(client, move, run_id)
    return version_uri


def _name_challenger(config: PipelineConfig, client, move, version_uri: str) -> str:
    """Where a front door serves the champion: name the version ``challenger``, its thresholds recorded on it;
    the follower shadows it and moves ``champion`` only if it passes (:func:`conclude_shadow`)."""
    from training.deploy.shadow import Thresholds
    from training.registry.promotion import CHALLENGER, SHADOWED, _set_tags

    thresholds = Thresholds.from_config(config)
    for key, value in {**thresholds.as_tags(), "bento_tag": move.bento_tag, "challenger_by": move.by,
                       "shadow_champion": move.previous}.items():
        client.set_model_version_tag(move.name, move.version, key, value)
    _set_tags(client, move.name, move.version, move.run_id, {"gate_decision": SHADOWED})
    client.set_registered_model_alias(move.name, CHALLENGER, move.version)
    log.info("a front door serves %s version %s: version %s is now %s; it becomes champion only if %.0f%% of live "
             "/predict requests mirrored to it (%d, or %g minutes) agree with the champion's answers on at least "
             "%.0f%% (training/deploy/shadow.py)", move.name, move.previous, move.version, CHALLENGER,
             100 * thresholds.share, thresholds.requests, thresholds.minutes, 100 * thresholds.min_agreement)
    return version_uri


def conclude_shadow(config: PipelineConfig, version: str, passed: bool, reason: str, figures: dict,
                    by: str = "front door") -> bool:
    """The end of ``version``'s shadow: its figures logged to its run, its record, and ``champion`` moved to it
    when it ``passed`` and the champion is still the one it was compared with. ``challenger`` is removed either
    way. Returns whether the champion moved."""
    from training.registry.promotion import (CHALLENGER, FAILED_SHADOW, ChampionChanged, Move, _set_tags, challenger,
                                             champion_version, client_for, mark_promoted, move_alias)

    client, name = client_for(config), config.registered_model_name
    mv = client.get_model_version(name, version)
    at = int(time.time() * 1000)
    for key, value in figures.items():
        if value is not None:
            client.log_metric(mv.run_id, f"shadow_{key}", float(value), timestamp=at)
    moved = False
    compared = mv.tags.get("shadow_champion", "")
    if passed and champion_version(client, name) != compared:
        passed, reason = False, (f"the champion moved from version {compared} while version {version} was shadowed "
                                 f"beside it; its {reason} no longer applies")
    if passed:
        move = Move(name, version, mv.run_id, "promote", compared, mv.tags["bento_tag"], reason, by)
        _set_tags(client, name, version, mv.run_id, {"shadow_decision": "passed", "shadow_reason": reason[:5000]})
        mark_promoted(client, move)
        run_id, _ = _record(config, client, move)
        try:
            move_alias(client, move, run_id)
            moved = True
        except ChampionChanged as exc:
            reason = str(exc)
    if not moved:
        _set_tags(client, name, version, mv.run_id, {"gate_decision": FAILED_SHADOW, "shadow_decision": "failed",
                                                     "shadow_reason": reason[:5000]})
        log.warning("%s version %s stays off: %s; the champion stays version %s", name, version, reason,
                    champion_version(client, name) or "none")
    held = challenger(client, name)
    if held is not None and str(held.version) == str(version):  # a newer challenger named meanwhile stays
        client.delete_registered_model_alias(name, CHALLENGER)
    return moved


def _check_target(mv, force: bool, reason: str) -> None:
    """Refuse a rollback to a version that did not pass both gates, unless forced with a reason."""
    from training.registry.promotion import FAILED_SERVING, FAILED_SHADOW, PROMOTED, REJECTED

    decision = mv.tags.get("gate_decision", "")
    if force:
        if not reason.strip():
            raise RollbackRefused(f"forcing a rollback to version {mv.version} needs a reason, which is recorded with "
                                  "the move: --reason TEXT (make rollback FORCE=1 REASON=..., or the rollback DAG's "
                                  "reason param)")
        if decision != PROMOTED:
            log.warning("forced rollback to version %s (gate_decision=%s): %s", mv.version, decision or "none", reason)
        return
    if decision == PROMOTED:
        return
    why = mv.tags.get("gate_reason", "")
    what = {FAILED_SERVING: f"failed the served-artifact check (gate_decision=failed_serving: {why})",
            REJECTED: f"lost the quality gate (gate_decision=rejected: {why})",
            FAILED_SHADOW: f"failed its shadow (gate_decision=failed_shadow: {mv.tags.get('shadow_reason', '')})"}.get(
        decision, f"was never promoted (gate_decision={decision or 'none'}): its Bento never passed the "
                  "served-artifact check")
    raise RollbackRefused(f"version {mv.version} {what}. Roll back to a version that was promoted, or force it with a "
                          "reason: --force --reason TEXT (make rollback FORCE=1 REASON=..., or the rollback DAG's "
                          "force and reason params)")


def _expect_champion(client, name: str, expected: str) -> None:
    """Stop, before anything is written, when the champion is no longer ``expected``."""
    from training.registry.promotion import ChampionChanged, champion_version

    now = champion_version(client, name)
    if now != expected:
        raise ChampionChanged(f"the champion of {name} moved from version {expected or 'none'} to {now or 'none'} "
                              "while this rollback prepared its Bento; nothing was moved. Check who moved it "
                              "(python -m training.deploy.champion show) and roll back again if you still mean to")


def rollback(config: PipelineConfig, to_version: str | int | None = None, reason: str = "", by: str | None = None,
             *, force: bool = False) -> Rollback:
    """Move ``champion`` to ``to_version`` (default: the previous champion) and make its Bento the served one.

    Only to a promoted version unless ``force`` (with a ``reason``). The champion is read when the
    rollback starts and again before anything is written and right before the alias moves: if it
    changed meanwhile, :class:`~training.registry.promotion.ChampionChanged` and nothing moves. The
    Bento is rebuilt only when the store lost it; with ``bento_export_uri`` set it is published again
    (its archive and sha256 recorded) before the alias moves; the image, when one exists for it, is
    tagged ``latest``.
    """
    from training.packaging.bento_store import publish_bento
    from training.registry.promotion import Move, champion_version, client_for, move_alias, previous_champion

    client = client_for(config)
    name = config.registered_model_name
    start = champion_version(client, name)
    if to_version in (None, ""):
        target = previous_champion(client, name, start or None)
        if target is None:
            raise NoChampion(f"{name} has no earlier champion than version {start or '(none)'} to roll back to; name a "
                             "version (VERSION=N, --to N)")
        to_version = str(target.version)
    to_version = str(to_version)
    if to_version == start:
        raise NoChampion(f"version {to_version} is already the champion")
    mv = client.get_model_version(name, to_version)
    _check_target(mv, force, reason)
    uri = f"models:/{name}/{to_version}"
    bento_tag, rebuilt = ensure_bento(config, uri)
    _expect_champion(client, name, start)
    if config.bento_export_uri:  # before the move: serving imports the champion's recorded archive
        log.info("published %s to %s", bento_tag, publish_bento(config, uri, bento_tag))
    move = Move(name, to_version, mv.run_id, "rollback", start, bento_tag,
                reason or f"rollback from version {start or '(none)'}", by or operator(), forced=force)
    run_id, image = _record(config, client, move)
    move_alias(client, move, run_id)
    log.info("champion is now version %s (was %s), served from Bento %s%s", to_version, start, bento_tag,
             " (rebuilt)" if rebuilt else "")
    return Rollback(to_version, start, bento_tag, rebuilt, image)


def main(argv: list[str] | None = None) -> int:
    from training.config import load_config
    from training.registry.promotion import ChampionChanged, champion_record, dumps

    parser = argparse.ArgumentParser(prog="python -m training.deploy.champion", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bento", help="print the champion's Bento tag")
    sub.add_parser("show", help="print the champion and its recorded move as JSON")
    back = sub.add_parser("rollback", help="move champion to the previous champion (or --to VERSION)")
    back.add_argument("--to", default=None, help="model version to move champion to (default: the previous one)")
    back.add_argument("--reason", default="", help="why (recorded on the version and in MLflow)")
    back.add_argument("--force", action="store_true",
                      help="roll back even to a version that failed the served-artifact check or lost the quality "
                           "gate (needs --reason)")
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
            done = rollback(config, args.to, args.reason, force=args.force)
            print(f"champion: version {done.previous or '-'} -> {done.version}; Bento {done.bento_tag}"
                  f"{' (rebuilt)' if done.rebuilt else ''}{f'; image {done.image}' if done.image else ''}")
    except (NoChampion, RollbackRefused, ChampionChanged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
