"""The pipeline's last packaging step on a cluster: the built Bento goes to shared storage.

Workers and serving machines do not share a BentoML store, so a serving step elsewhere
imports the Bento from ``bento_export_uri`` (``python -m training.packaging.bento_store
import URI``) instead of reaching into the store of the worker that built it.
"""

from __future__ import annotations

from training.config import PipelineConfig


def publish_bento(config: PipelineConfig, bento_tag: str) -> str:
    """Export ``bento_tag`` to ``config.bento_export_uri`` and return the archive's URI; "" when none is set."""
    if not config.bento_export_uri:
        return ""
    from training.packaging.bento_store import export_bento

    return export_bento(config, bento_tag, config.bento_export_uri)
