"""Where the served Bento stands on one host: its two slots, their ports, and the record the follower keeps.

Shared by training/deploy/stack.py (a fresh `up` serves from the blue slot) and training/deploy/follow.py (which
switches slots when the champion moves).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

SLOTS = ("blue", "green")


@dataclass
class Served:
    """What the front door forwards to: the slot (None: nothing yet), its Bento tag and the version it serves."""

    slot: str | None = None
    tag: str = ""
    version: str = ""


def other(slot: str | None) -> str:
    """The slot a new Bento starts in: the idle one (blue when nothing is served yet)."""
    return "green" if slot == "blue" else "blue"


def slot_port(env: dict[str, str], slot: str) -> int:
    """Each slot's loopback port: BENTO_PORT for blue, the next one for green."""
    return int(env["BENTO_PORT"]) + SLOTS.index(slot)


def load(run: Path) -> Served:
    try:
        return Served(**json.loads((run / "serving.json").read_text()))
    except (OSError, ValueError, TypeError):
        return Served()


def save(run: Path, served: Served) -> None:
    tmp = run / "serving.json.tmp"
    tmp.write_text(json.dumps(asdict(served)))
    tmp.replace(run / "serving.json")


def assign(run: Path, slot: str, tag: str) -> None:
    """Name the Bento that ``slot``'s program serves the next time it starts."""
    (run / f"bento-{slot}.tag").write_text(tag + "\n")
