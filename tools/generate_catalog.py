"""Regenerate raytseg/tasks/catalog.json from an installed TotalSegmentator package.

raytseg must number classes and pick models exactly as TotalSegmentator does, so the
catalogue is not typed by hand: it is read from TotalSegmentator's own tables
(``map_to_binary.py``, ``map_tasks_config.py``, ``registry.py``) and written as plain
JSON that raytseg loads without importing torch, ray or TotalSegmentator.

Run it with a Python that has ``totalsegmentator`` installed (the reference venv that
``.ci/run`` builds has it):

    .venv-ref/bin/python tools/generate_catalog.py > raytseg/tasks/catalog.json

``tests/reference/test_catalog_matches_totalsegmentator.py`` regenerates it in CI and
fails if the committed file differs.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from totalsegmentator import map_tasks_config as tasks_cfg
from totalsegmentator import map_to_binary as maps
from totalsegmentator.registry import TASKS, task_modality

# TotalSegmentator's own test model: crop given as a deprecated string, weights not published.
EXCLUDED_TASKS = {"test"}
# nnunet.py: step 0.8 "for every resolution variant of the total CT and MR models".
TOTAL_TASKS = {"total", "total_v3", "total_mr"}
# nnunet.py: ``v1_order and task_name == "total"`` renumbers as class_map["total_v1"].
V1_ORDER_TASKS = {"total"}
PART_TABLES = {
    "total": (maps.class_map_5_parts, maps.map_taskid_to_partname_ct),
    "total_v3": (maps.class_map_5_parts_total_v3, maps.map_taskid_to_partname_ct_v3),
    "total_mr": (maps.class_map_parts_mr, maps.map_taskid_to_partname_mr),
    "headneck_muscles": (maps.class_map_parts_headneck_muscles, maps.map_taskid_to_partname_headneck_muscles),
}


def _xyz(resample: Any) -> list[float] | None:
    if resample is None:
        return None
    if isinstance(resample, (int, float)):
        return [float(resample)] * 3
    return [float(v) for v in resample]


def _labels(mapping: dict[int, str]) -> dict[str, str]:
    return {str(k): v for k, v in sorted(mapping.items())}


def _model(task: str, dataset_id: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One nnU-Net model: where its folder is and which label ids it predicts."""
    if task in PART_TABLES and isinstance(cfg["task_id"], list):
        parts, part_of = PART_TABLES[task]
        labels = parts[part_of[dataset_id]]
    else:
        labels = dict(maps.class_map[task])
        labels.update(maps.class_map.get(f"{task}_auxiliary", {}))
    return {
        "dataset_id": dataset_id,
        "trainer": cfg["trainer"],
        "plans": cfg["plans"] or "nnUNetPlans",
        "configuration": cfg["model"],
        "folds": cfg["folds"],
        "labels": _labels(labels),
    }


def _mode(task: str, cfg: dict[str, Any]) -> dict[str, Any]:
    ids = cfg["task_id"] if isinstance(cfg["task_id"], list) else [cfg["task_id"]]
    return {"models": [_model(task, i, cfg) for i in ids], "resample_mm": _xyz(cfg["resample"])}


def _preview_groups() -> dict[str, list[list[str]]]:
    """``roi_groups`` of TotalSegmentator's preview.py: the classes of each 3D preview column.

    Read from the source (importing preview.py needs fury, which the reference env lacks),
    plus the two tasks it derives after the literal: total_v3 and vertebrae_pp_refined.
    """
    spec = importlib.util.find_spec("totalsegmentator.preview")
    assert spec is not None
    assert spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    literal = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "roi_groups"
    )
    groups: dict[str, list[list[str]]] = ast.literal_eval(literal)
    groups["total_v3"] = [["vertebrae_L6" if r == "vertebrae_S1" else r for r in g] for g in groups["total"]]
    groups["vertebrae_pp_refined"] = groups["vertebrae_pp"]
    return groups


def _task(task: str) -> dict[str, Any]:
    raw = tasks_cfg.TASK_CONFIGS[task]
    base = {**tasks_cfg.DEFAULT_CONFIG, **{k: v for k, v in raw.items() if k != "sub_modes"}}
    if "sub_modes" in raw:
        modes = {name: _mode(task, {**base, **sub}) for name, sub in raw["sub_modes"].items()}
    else:
        modes = {"default": _mode(task, base)}
    crop = None
    if base["crop"] is not None:
        crop = {
            "rois": list(base["crop"]),
            "addon_mm": [float(v) for v in base["crop_addon"]],
            "robust": bool(base["robust_crop"]),
            "crop_task": base["crop_model"],
        }
    remove_outside = None
    if base["remove_outside"] is not None:
        remove_outside = {
            "rois": list(base["remove_outside"]),
            "dilation_mm": float(base["remove_outside_dilation"]),
        }
    return {
        "modality": task_modality(task),
        "license_required": task in maps.commercial_models,
        "fast_allowed": "sub_modes" in raw or not base["disallow_fast"],
        "step_size": 0.8 if task in TOTAL_TASKS else 0.5,
        "classes": _labels(maps.class_map[task]),
        "auxiliary": _labels(maps.class_map.get(f"{task}_auxiliary", {})),
        "v1_classes": _labels(maps.class_map[f"{task}_v1"]) if task in V1_ORDER_TASKS else None,
        "preview_groups": _preview_groups().get(task),
        "modes": modes,
        "crop": crop,
        "body_crop_addon_mm": [float(v) for v in base["crop_addon"]],
        "remove_outside": remove_outside,
        "info": raw.get("info_msg", "").strip() or None,
    }


def _datasets() -> dict[str, Any]:
    licensed_task = {v: k for k, v in maps.commercial_models.items()}
    out = {}
    for key, info in tasks_cfg.TASK_ID_WEIGHTS_CONFIGS.items():
        if not isinstance(key, int):
            continue  # body-stats regressors, not segmentation models
        version = info.get("version")
        out[str(key)] = {
            "folder": info["foldername"],
            "release": None if version in (None, "TODO") else version,
            "license_task": licensed_task.get(key),
        }
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def main() -> None:
    catalog = {
        "generated_from": f"TotalSegmentator {importlib.metadata.version('TotalSegmentator')}",
        "datasets": _datasets(),
        "tasks": {t: _task(t) for t in TASKS if t not in EXCLUDED_TASKS},
    }
    json.dump(catalog, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
