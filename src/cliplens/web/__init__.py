"""The web UI and JSON API: ``create_app(indexes)`` returns a FastAPI app; ``cliplens serve`` runs it.

FastAPI is an optional dependency (``pip install cliplens[web]``), imported only when an app is created.
"""

from __future__ import annotations

__all__ = ["create_app", "EncoderService", "WebLimits"]


def __getattr__(name: str):
    if name in ("create_app", "WebLimits"):
        from cliplens.web import app

        return getattr(app, name)
    if name == "EncoderService":
        from cliplens.web.service import EncoderService

        return EncoderService
    raise AttributeError(name)
