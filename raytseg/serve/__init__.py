"""raytseg on Ray Serve: an HTTP service over the pipeline stages.

``build_app`` (``raytseg.serve.app:build_app``) builds the Serve application from a
``ServeConfig``; ``raytseg serve`` runs it on a local Ray. Importing this package imports
neither Ray nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raytseg.serve.config import ServeConfig, load_config

if TYPE_CHECKING:
    from raytseg.serve.app import build_app

__all__ = ["ServeConfig", "build_app", "load_config"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from raytseg.serve.app import build_app

        return build_app
    raise AttributeError(f"module 'raytseg.serve' has no attribute {name!r}")
