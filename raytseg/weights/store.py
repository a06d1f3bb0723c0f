"""Find a model's nnU-Net folder, locally or in a cache filled from remote storage.

The layout is nnU-Net's results layout, as TotalSegmentator downloads it::

    <root>/Dataset297_TotalSegmentator_total_3mm_1559subj/
        nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/
            plans.json  dataset.json  fold_0/checkpoint_final.pth

``root`` is ``Settings.weights_dir``, or, when ``Settings.weights_uri`` is set, a cache
folder ``<cache_dir>/weights/<sha256(uri)[:16]>`` filled on demand:

- a prefix URI (``s3://bucket/prefix``, ``memory://…``) holding the same layout: only the
  files a model needs are copied, into a temporary folder that is then renamed into
  place, so no process ever sees a half-copied model;
- a zip URI (``https://…/weights.zip``, ``s3://…/weights.zip``) holding ``DatasetNNN_*``
  top folders: downloaded and extracted once, with the same safety as downloads.

Checkpoints are pickles, so only files whose real path lies inside ``root`` are handed out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Any

from raytseg import storage
from raytseg.config import Settings
from raytseg.errors import (
    MissingWeightsError,
    RaytsegError,
    StorageError,
    UnsafeArchiveError,
    WeightsIntegrityError,
)
from raytseg.pipeline.plan import REFINEMENTS
from raytseg.retry import OUTAGE_RETRY
from raytseg.tasks.registry import ModelSpec, TaskSpec, get_task, load_catalog
from raytseg.weights import _archive, _http
from raytseg.weights.license import LICENSE_URL, SET_LICENSE_COMMAND

logger = logging.getLogger(__name__)

PLANS_FILE = "plans.json"
DATASET_FILE = "dataset.json"
CHECKPOINT_FILE = "checkpoint_final.pth"

# Models a task's crop pass may run (TotalSegmentator ``python_api.totalsegmentator``):
# the 6 mm ``total`` model, or the 3 mm one with --robust_crop / roi_subset_robust; MR
# always uses the 3 mm MR model; crops to body_trunc / body_extremities use the body model.
CT_CROP_DATASETS = (298, 297)
MR_CROP_DATASETS = (852,)
BODY_CROP_DATASETS = (300,)
_BODY_ROIS = frozenset({"body_trunc", "body_extremities"})


def datasets_for_task(
    task: str, *, fast: bool = False, fastest: bool = False, with_crop_models: bool = True
) -> list[int]:
    """Dataset ids a task needs, in download order, without duplicates.

    With ``with_crop_models`` this includes the models its crop pass or ``roi_subset`` may
    run, so ``datasets_for_task("total")`` is ``[291, 292, 293, 294, 295, 298, 297]``.

    Raises:
        UnknownTaskError: no such task.
        InvalidOptionError: ``fast``/``fastest`` for a task with a single resolution.
    """
    spec = get_task(task)
    _, mode = spec.select_mode(fast=fast, fastest=fastest)
    ids = [model.dataset_id for model in mode.models]
    if task in REFINEMENTS:  # the refining model runs besides the task's own
        ids.append(REFINEMENTS[task].by_dataset)
    if with_crop_models:
        ids += _crop_datasets(spec)
    return list(dict.fromkeys(ids))


def _crop_datasets(spec: TaskSpec) -> list[int]:
    if spec.crop is not None and spec.crop.crop_task is not None:
        return datasets_for_task(spec.crop.crop_task)
    if spec.crop is not None and _BODY_ROIS.intersection(spec.crop.rois):
        return list(BODY_CROP_DATASETS)
    # roi_subset is accepted by the ``total*`` tasks only.
    if spec.crop is None and not spec.name.startswith("total"):
        return []
    return list(MR_CROP_DATASETS if spec.modality == "MR" else CT_CROP_DATASETS)


def dataset_folder_name(dataset_id: int) -> str:
    """The catalogue's folder name for a dataset id (a glob for ids it lacks)."""
    dataset = load_catalog().datasets.get(dataset_id)
    return dataset.folder if dataset is not None else f"Dataset{dataset_id:03d}_*"


def find_dataset_folders(root: Path, dataset_id: int) -> list[Path]:
    """Every ``Dataset<id:03d>_*`` folder in ``root`` (nnU-Net needs exactly one)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())


def task_for_dataset(dataset_id: int) -> str | None:
    """The first catalogue task that runs a dataset's model (for fix-it messages)."""
    found = _task_and_mode(dataset_id)
    return None if found is None else found[0]


def _task_and_mode(dataset_id: int) -> tuple[str, str] | None:
    for name, task in load_catalog().tasks.items():
        for mode_name, mode in task.modes.items():
            if any(m.dataset_id == dataset_id for m in mode.models):
                return name, mode_name
    return None


def _task_flags(dataset_id: int) -> str:
    """``total --fast`` style arguments naming the task mode that uses a dataset."""
    found = _task_and_mode(dataset_id)
    if found is None:
        return "<task>"
    name, mode = found
    return name if mode == "default" else f"{name} --{mode}"


def how_to_get(dataset_id: int, root: Path | None = None) -> str:
    """The command(s) that put a dataset's weights in place (into ``root`` when given)."""
    dataset = load_catalog().datasets.get(dataset_id)
    task = _task_flags(dataset_id)
    synth = (
        f"For tests only, random weights: `raytseg weights synth -t {task} -o {root or '<weights folder>'}`."
    )
    if dataset is None or not dataset.downloadable:
        return (
            f"TotalSegmentator does not publish dataset {dataset_id}, so it cannot be downloaded; "
            f"copy the folder there yourself. {synth}"
        )
    if dataset.release is None:
        return (
            f"It needs a license: get one at {LICENSE_URL}, run `{SET_LICENSE_COMMAND}`, then "
            f"`raytseg weights download -t {task}`. {synth}"
        )
    return (
        f"Download it with `raytseg weights download -t {task}` (or import a zip with "
        f"`raytseg weights import <zip>`). {synth}"
    )


class WeightsStore:
    """Resolves models to nnU-Net model folders under one root.

    Example:
        >>> store = WeightsStore(Settings.from_env())  # doctest: +SKIP
        >>> store.model_folder(get_task("total").modes["fast"].models[0])  # doctest: +SKIP
        PosixPath('.../Dataset297_.../nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres')
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.uri = settings.weights_uri
        if self.uri is None:
            self.root = settings.weights_dir
        else:
            digest = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
            self.root = settings.cache_dir / "weights" / digest

    @property
    def location(self) -> str:
        """Where the weights come from, for messages: the URI, or the local root."""
        return self.uri if self.uri is not None else str(self.root)

    def model_folder(self, spec: ModelSpec) -> Path:
        """``<root>/Dataset<id>_*/<trainer__plans__config>``, complete for ``spec.folds``.

        Raises:
            MissingWeightsError: the folder or one of its files is absent (the message says
                which, and the command that fixes it).
            WeightsIntegrityError: several folders share the dataset id.
            StorageError: fetching from ``weights_uri`` failed.
        """
        uri = self.uri
        if uri is not None and _is_zip_uri(uri):
            OUTAGE_RETRY.call(lambda: self._fetch_zip(uri), f"Fetching {uri}")
        elif uri is not None:
            what = f"Fetching model {spec.dataset_id} from {uri}"
            OUTAGE_RETRY.call(lambda: self._fetch_model(uri, spec), what)
        folder = self._dataset_folder(spec) / spec.trainer_folder
        self._check_complete(folder, spec)
        return folder

    def checkpoint_paths(self, spec: ModelSpec) -> list[Path]:
        """``fold_k/checkpoint_final.pth`` for each fold (every fold found when ``folds`` is None).

        Raises:
            WeightsIntegrityError: a checkpoint resolves (via links) outside the store root.
        """
        folder = self.model_folder(spec)
        return [self._inside_root(folder / fold / CHECKPOINT_FILE) for fold in _fold_names(folder, spec)]

    def read_plans(self, spec: ModelSpec) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's ``plans.json`` and ``dataset.json``."""
        folder = self.model_folder(spec)
        plans = _read_json(self._inside_root(folder / PLANS_FILE))
        return plans, _read_json(self._inside_root(folder / DATASET_FILE))

    def _dataset_folder(self, spec: ModelSpec) -> Path:
        matches = find_dataset_folders(self.root, spec.dataset_id)
        if len(matches) > 1:
            names = ", ".join(p.name for p in matches)
            raise WeightsIntegrityError(
                f"{self.root} holds several folders for dataset {spec.dataset_id}: {names}. nnU-Net "
                f"cannot tell them apart; move all but {dataset_folder_name(spec.dataset_id)} elsewhere."
            )
        if not matches:
            expected = f"{dataset_folder_name(spec.dataset_id)}/{spec.trainer_folder}"
            raise MissingWeightsError(self._missing(spec, f"the folder {expected} is not in {self.location}"))
        return matches[0]

    def _check_complete(self, folder: Path, spec: ModelSpec) -> None:
        missing = [name for name in (PLANS_FILE, DATASET_FILE) if not (folder / name).is_file()]
        if spec.folds is None:
            if not _fold_names(folder, spec):
                missing.append(f"fold_*/{CHECKPOINT_FILE}")
        else:
            wanted = (f"fold_{k}/{CHECKPOINT_FILE}" for k in spec.folds)
            missing += [name for name in wanted if not (folder / name).is_file()]
        if missing:
            raise MissingWeightsError(self._missing(spec, f"{folder} lacks {', '.join(missing)}"))

    def _missing(self, spec: ModelSpec, what: str) -> str:
        message = f"Weights for dataset {spec.dataset_id} are missing: {what}."
        if self.uri is not None:
            folder = dataset_folder_name(spec.dataset_id)
            return (
                f"{message} Put the folder at {self.uri.rstrip('/')}/{folder}/: get it locally first "
                f"({how_to_get(spec.dataset_id)}), then copy it there."
            )
        return f"{message} {how_to_get(spec.dataset_id, self.root)}"

    def _inside_root(self, path: Path) -> Path:
        real = Path(os.path.realpath(path))
        root = Path(os.path.realpath(self.root))
        if not real.is_relative_to(root):
            raise WeightsIntegrityError(
                f"{path} resolves to {real}, outside the weights folder {root}. Model files are pickles, "
                "so raytseg loads them only from inside the weights folder: copy them there instead of "
                "linking, or point the weights setting at the real folder."
            )
        return real

    def _fetch_model(self, uri: str, spec: ModelSpec) -> None:
        """Copy the model's files from a prefix URI into the cache, unless already there."""
        try:
            self._check_complete(self._dataset_folder(spec) / spec.trainer_folder, spec)
            return
        except MissingWeightsError:
            pass
        fs, base = storage.filesystem(uri)
        remote_dataset = self._remote_dataset(fs, base, spec)
        remote_trainer = f"{remote_dataset}/{spec.trainer_folder}"
        folds = _remote_folds(fs, remote_trainer, spec)
        local_trainer = self.root / storage.base_name(remote_dataset) / spec.trainer_folder
        if not local_trainer.is_dir():
            files = [PLANS_FILE, DATASET_FILE, *(f"{fold}/{CHECKPOINT_FILE}" for fold in folds)]
            self._copy_atomically(fs, remote_trainer, files, local_trainer)
            return
        for fold in folds:
            if not (local_trainer / fold / CHECKPOINT_FILE).is_file():
                self._copy_atomically(fs, f"{remote_trainer}/{fold}", [CHECKPOINT_FILE], local_trainer / fold)

    def _remote_dataset(self, fs: Any, base: str, spec: ModelSpec) -> str:
        pattern = f"{base.rstrip('/')}/Dataset{spec.dataset_id:03d}_*"
        try:
            matches = sorted(m for m in fs.glob(pattern) if fs.isdir(m))
        except Exception as exc:  # fsspec backends raise their own client errors too
            raise storage.storage_error(str(self.uri), "list", exc) from exc
        if len(matches) > 1:
            raise WeightsIntegrityError(
                f"{self.uri} holds several folders for dataset {spec.dataset_id}: {', '.join(matches)}; "
                "keep exactly one."
            )
        if not matches:
            expected = f"{dataset_folder_name(spec.dataset_id)}/{spec.trainer_folder}"
            raise MissingWeightsError(self._missing(spec, f"the folder {expected} is not in {self.uri}"))
        return str(matches[0])

    def _copy_atomically(self, fs: Any, remote_dir: str, names: list[str], target: Path) -> None:
        """Copy ``remote_dir/<name>`` files into a temporary folder, then rename it to ``target``."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.root))
        try:
            for name in names:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                _get_file(fs, f"{remote_dir}/{name}", tmp / name)
            logger.info("Fetched %s into %s", remote_dir, target)
            _archive.rename_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _fetch_zip(self, uri: str) -> None:
        if self.root.is_dir():
            return
        self.root.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{self.root.name}-", dir=self.root.parent))
        try:
            archive = work / "weights.zip"
            _download_uri(uri, archive, self.settings.max_archive_bytes)
            extracted = work / "weights"
            _archive.safe_extract(archive, extracted, self.settings.max_archive_bytes)
            top = _archive.weights_top(extracted)
            for child in top.iterdir():
                dataset_id = _archive.dataset_id_of(child.name)
                if dataset_id is not None:
                    _archive.verify_known_checksums(child, dataset_id, allow_synthetic=True)
            logger.info("Extracted %s into %s", uri, self.root)
            _archive.rename_into_place(top, self.root)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _fold_names(folder: Path, spec: ModelSpec) -> list[str]:
    """``fold_k`` names: the spec's folds, or every ``fold_*`` holding a checkpoint."""
    if spec.folds is not None:
        return [f"fold_{k}" for k in spec.folds]
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.glob("fold_*") if (p / CHECKPOINT_FILE).is_file()]
    return sorted(found, key=_fold_order)


def _fold_order(name: str) -> tuple[int, str]:
    """fold_0 … fold_10 numerically, then fold_all."""
    suffix = name.removeprefix("fold_")
    return (int(suffix), "") if suffix.isdigit() else (1 << 30, suffix)


def _remote_folds(fs: Any, remote_trainer: str, spec: ModelSpec) -> list[str]:
    if spec.folds is not None:
        return [f"fold_{k}" for k in spec.folds]
    try:
        found = fs.glob(f"{remote_trainer}/fold_*/{CHECKPOINT_FILE}")
    except Exception as exc:
        raise storage.storage_error(remote_trainer, "list", exc) from exc
    folds = sorted({str(p).rstrip("/").split("/")[-2] for p in found})
    if not folds:
        raise MissingWeightsError(f"{remote_trainer} holds no fold_*/{CHECKPOINT_FILE}.")
    return folds


def _get_file(fs: Any, remote: str, local: Path) -> None:
    try:
        fs.get_file(remote, str(local))
    except FileNotFoundError as exc:
        raise MissingWeightsError(f"{remote} does not exist; upload the complete model folder.") from exc
    except Exception as exc:
        raise storage.storage_error(remote, "copy", exc) from exc


def _is_zip_uri(uri: str) -> bool:
    """``…/weights.zip``, also with a query string (pre-signed URLs)."""
    return urllib.parse.urlsplit(uri).path.rstrip("/").endswith(".zip")


def _download_uri(uri: str, dest: Path, max_bytes: int) -> None:
    if uri.startswith(("http://", "https://")):
        try:
            _http.download(uri, dest, max_bytes=max_bytes)
        except urllib.error.HTTPError as exc:
            raise StorageError(f"Download of {uri} failed: HTTP {exc.code} {exc.reason}.") from exc
        return
    fs, path = storage.filesystem(uri)
    try:
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise UnsafeArchiveError(f"{uri} is {size} bytes, more than the limit of {max_bytes}.")
        fs.get_file(path, str(dest))
    except FileNotFoundError as exc:
        raise MissingWeightsError(f"The weights archive {uri} does not exist.") from exc
    except RaytsegError:
        raise
    except Exception as exc:
        raise storage.storage_error(uri, "download", exc) from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise WeightsIntegrityError(f"{path} is not valid JSON ({exc}); download the model again.") from exc
    except OSError as exc:
        raise StorageError(f"Could not read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise WeightsIntegrityError(f"{path} does not hold a JSON object; download the model again.")
    return data
