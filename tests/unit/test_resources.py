"""TotalSegmentator's resource files imported from a wheel or a folder (``raytseg weights
import``), then found there when no TotalSegmentator package is installed."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from raytseg import resources
from raytseg.cli import main
from raytseg.errors import InvalidOptionError
from raytseg.pipeline import modality, phase
from raytseg.resources import IMPORTED_FOLDER

CT = Path(__file__).resolve().parents[2] / "examples" / "data" / "example_ct_sm.nii.gz"


def _installed() -> Path:
    """The installed TotalSegmentator package's resources folder (setup-env installs it)."""
    return resources.resource_path(phase.CLASSIFIERS, "test").parent


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    """A wheel's layout: the installed resources, a report subfolder, code, an escaping member."""
    path = tmp_path / "TotalSegmentator-2.18.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("totalsegmentator/__init__.py", "")
        for name in _files(_installed()):
            archive.write(_installed() / name, f"totalsegmentator/resources/{name}")
        archive.writestr("totalsegmentator/resources/aorta_report/template.html", "<html/>")
        archive.writestr("totalsegmentator/resources/../../escaped.txt", "outside")
        archive.writestr("TotalSegmentator-2.18.0.dist-info/METADATA", "Name: TotalSegmentator")
    return path


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty weights folder, no RAYTSEG_TS_RESOURCES; the classifier caches cleared."""
    weights = tmp_path / "weights"
    monkeypatch.setenv("RAYTSEG_WEIGHTS", str(weights))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    monkeypatch.delenv("RAYTSEG_TS_RESOURCES", raising=False)
    modality._folds.cache_clear()
    yield weights
    modality._folds.cache_clear()


def test_a_wheel_is_imported_and_used_without_the_package(
    wheel: Path,
    store: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    installed, imported = _installed(), store / IMPORTED_FOLDER
    assert main(["weights", "import", str(wheel)]) == 0
    names = _files(installed)
    assert {"contrast_phase_classifiers_2024_07_19.pkl", "totalsegmentator_snomed_mapping.csv"} < set(names)
    assert sorted(p.name for p in imported.iterdir()) == names  # no subfolder, no partial file
    assert capsys.readouterr().out.split() == [str(imported / name) for name in names]
    assert all((imported / n).read_bytes() == (installed / n).read_bytes() for n in names)
    assert not list(tmp_path.rglob("escaped.txt"))

    monkeypatch.setattr(resources.importlib.util, "find_spec", lambda name: None)  # no package
    assert resources.resource_path(phase.CLASSIFIERS, "test") == imported / phase.CLASSIFIERS
    out = tmp_path / "modality.json"
    assert main(["get-modality", "-i", str(CT), "-o", str(out), "-q"]) == 0
    assert json.loads(out.read_text()) == {"modality": "ct", "probability": 1.0}


def test_a_folder_holding_the_package_is_imported_and_a_rerun_replaces(
    wheel: Path, store: Path, tmp_path: Path
) -> None:
    unpacked = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked, [m for m in archive.namelist() if ".." not in m])
    first = resources.import_resources(unpacked, store)
    (store / IMPORTED_FOLDER / phase.CLASSIFIERS).write_bytes(b"stale")
    assert resources.import_resources(unpacked, store) == first
    assert [p.name for p in first] == _files(_installed())
    assert (store / IMPORTED_FOLDER / phase.CLASSIFIERS).read_bytes() == (
        _installed() / phase.CLASSIFIERS
    ).read_bytes()


def test_anything_else_is_refused_with_what_to_give(store: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("somepackage/resources/file.json", "{}")
    not_zip = tmp_path / "broken.whl"
    not_zip.write_bytes(b"not a zip")
    (tmp_path / "empty").mkdir()
    for source, message in (
        (other, "holds no totalsegmentator/resources files.*pip download"),
        (tmp_path / "empty", "holds no totalsegmentator/resources files"),
        (not_zip, "neither a wheel"),
    ):
        with pytest.raises(InvalidOptionError, match=message):
            resources.import_resources(source, store)
    assert not (store / IMPORTED_FOLDER).exists()
