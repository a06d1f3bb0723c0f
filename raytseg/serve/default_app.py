"""The app built from the environment, as a module-level object for ``serve build``.

``serve build`` wants an ``Application`` object, not a builder, so this module builds one
when imported (from ``RAYTSEG_SERVE_CONFIG`` and ``RAYTSEG_SERVE__*``)::

    RAYTSEG_SERVE_CONFIG=serve.yaml serve build raytseg.serve.default_app:app -o serve-config.yaml

Everything else (``serve run``, ``serve deploy``, KubeRay ``serveConfigV2``) should use the
builder, ``raytseg.serve.app:build_app``, which reads its config when Serve calls it.
"""

from __future__ import annotations

from raytseg.serve.app import build_app

app = build_app()
