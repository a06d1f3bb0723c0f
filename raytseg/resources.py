"""TotalSegmentator's data files (classifiers, the SNOMED-CT mapping), found where users have them.

They ship inside TotalSegmentator's PyPI package (``totalsegmentator/resources/``) and are
never copied into raytseg. A file is taken from, in order:

1. ``RAYTSEG_TS_RESOURCES``: a folder holding the files (e.g. the ``resources`` folder of an
   unpacked TotalSegmentator wheel, mounted read-only in a container);
2. the installed TotalSegmentator package (``pip install --no-deps TotalSegmentator==2.18.0``
   installs it without its dependencies; the package is never imported).

Only these locations are trusted: the contrast-phase classifier is a pickle, and a pickle
runs code when loaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from raytseg.errors import MissingResourceError

INSTALL_HINT = "pip install --no-deps TotalSegmentator==2.18.0"


def resource_path(name: str, needed_for: str) -> Path:
    """The trusted location of TotalSegmentator's resource file ``name``.

    Raises:
        MissingResourceError: in neither location; says how to provide it.
    """
    for folder in _folders():
        path = folder / name
        if path.is_file():
            return path
    raise MissingResourceError(
        f"{needed_for} needs TotalSegmentator's {name}, which is in neither $RAYTSEG_TS_RESOURCES nor an "
        f"installed TotalSegmentator package. Install it with `{INSTALL_HINT}`, or point "
        "RAYTSEG_TS_RESOURCES at the resources folder of a TotalSegmentator 2.18 wheel."
    )


def _folders() -> list[Path]:
    from raytseg.config import resources_dir

    configured = resources_dir()
    spec = importlib.util.find_spec("totalsegmentator")
    installed = [] if spec is None else [Path(p) / "resources" for p in spec.submodule_search_locations or []]
    return ([configured] if configured is not None else []) + installed
