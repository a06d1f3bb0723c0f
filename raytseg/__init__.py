"""raytseg: TotalSegmentator's segmentation as a distributed service on Ray.

Importing raytseg is cheap: torch, nnU-Net and Ray load only when a stage needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raytseg.errors import RaytsegError
from raytseg.version import __version__ as __version__

if TYPE_CHECKING:
    from raytseg.pipeline.run import segment

__all__ = ["RaytsegError", "segment"]


def __getattr__(name: str) -> Any:
    if name == "segment":
        from raytseg.pipeline.run import segment

        return segment
    raise AttributeError(f"module 'raytseg' has no attribute {name!r}")
