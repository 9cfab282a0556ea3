"""The pipeline's last packaging step on a cluster: the built Bento goes to shared storage.

Workers and serving machines do not share a BentoML store, so a serving step elsewhere imports
the champion's Bento (``python -m training.packaging.bento_store import``) instead of reaching
into the store of the worker that built it. Publishing records on the model version where the
archive went and its sha256, and serving imports exactly that archive or nothing.
"""

from __future__ import annotations

from training.config import PipelineConfig


def publish_bento(config: PipelineConfig, version_uri: str, bento_tag: str) -> str:
    """Export ``bento_tag`` to ``config.bento_export_uri``, record the archive on ``version_uri``; return its URI.

    Returns "" when no export URI is set. Safe to repeat: the archive and its record are rewritten.
    """
    if not config.bento_export_uri:
        return ""
    from training.packaging.bento_store import export_bento
    from training.registry.promotion import record_published

    archive = export_bento(config, bento_tag, config.bento_export_uri)
    record_published(config, version_uri, archive.uri, archive.sha256)
    return archive.uri
