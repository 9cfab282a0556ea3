"""Run a container build command, retrying once when the network (not the recipe) failed."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

# Lines in a failed build's output that mean the network, not the recipe, failed.
NETWORK_ERROR = re.compile(
    r"temporary failure in name resolution|could not resolve|name or service not known|dns error"
    r"|connection (refused|reset|timed out|aborted)|network is unreachable|no route to host"
    r"|failed to (fetch|download|connect|establish a new connection)|newconnectionerror|error sending request|couldn't download|failed getting release file"
    r"|tls handshake|certificate verify failed|read timed out|connecttimeout|max retries exceeded|no such host|i/o timeout"
    r"|(502|503|504) (bad gateway|service unavailable|gateway time-?out)|remote end closed connection",
    re.IGNORECASE)


class ContainerBuildError(RuntimeError):
    """The image build failed for a reason other than the network."""


class NetworkBuildError(ContainerBuildError):
    """The image build failed twice because the network failed."""


def is_network_failure(output: str) -> bool:
    """Whether a failed command's output (its last lines) blames the network."""
    return bool(NETWORK_ERROR.search("\n".join(output.splitlines()[-80:])))


def run_with_network_retry(cmd: list[str], *, env: dict[str, str], log_path: Path, what: str,
                           before_retry: Callable[[], None] | None = None,
                           runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """Run ``cmd`` (output to ``log_path``); retry once if the network failed, else raise.

    A second network failure raises :class:`NetworkBuildError` saying so; any other
    failure raises :class:`ContainerBuildError` with the log's tail and path.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        with open(log_path, "w") as out:
            result = runner(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        if result.returncode == 0:
            return
        output = log_path.read_text(errors="replace")
        tail = "\n".join(output.splitlines()[-25:])
        if not is_network_failure(output):
            raise ContainerBuildError(f"{what} failed (exit {result.returncode}); full log: {log_path}\n{tail}")
        if attempt == 2:
            raise NetworkBuildError(
                f"{what} failed twice because of the NETWORK (a package index or mirror could not be reached); "
                f"check DNS/proxy access to PyPI and the Debian mirror, then rerun. Full log: {log_path}\n{tail}")
        log.warning("%s hit a network error; retrying once. Last lines:\n%s", what, tail)
        if before_retry is not None:
            before_retry()
