"""The stage classes called directly, without Ray: the same bytes as the in-process pipeline."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from raytseg.config import Settings
from raytseg.errors import ModelError
from raytseg.pipeline.export import multilabel_nifti_bytes, output_files
from raytseg.pipeline.load import LoadLimits, load_volume
from raytseg.pipeline.passes import empty_segmentation
from raytseg.pipeline.plan import passes, plan_run
from raytseg.pipeline.preprocess import model_key
from raytseg.pipeline.records import OutputOptions, SegmentOptions
from raytseg.serve.config import ServeConfig, load_config
from raytseg.serve.handoff import AfterPass, Delivery, Tags
from raytseg.serve.models import ModelServer, _DeviceGuard
from raytseg.serve.stages import CpuStage, PassSpec

EXAMPLE_CT = Path(__file__).resolve().parents[3] / "examples" / "data" / "example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ServeConfig:
    from raytseg.weights.synth import synthesize_task

    root = tmp_path_factory.mktemp("weights")
    synthesize_task("total", root, fast=True, tiny=True)
    cpu = {"num_gpus": 0}
    return load_config({"device": "cpu", "weights": str(root), "models": cpu, "pool": cpu}, {})


@pytest.fixture(scope="module")
def ct() -> bytes:
    img: Any = nib.load(EXAMPLE_CT)
    return gzip.compress(img.slicer[40:64, 40:64, 10:20].to_bytes())


def test_stages_equal_the_in_process_pipeline(config: ServeConfig, ct: bytes) -> None:
    import torch

    from raytseg.pipeline.run import Segmenter
    from raytseg.weights.store import WeightsStore

    options = SegmentOptions(fast=True)
    plan = plan_run(options)
    stage = CpuStage(config)
    tags = Tags("total", "http")
    spec = PassSpec(passes(plan, options), 0, tags, Delivery())
    volume = stage.load(ct, tags, OutputOptions())
    volume.data.flags.writeable = False  # as read from the object store
    prepared = stage.prepare(spec, volume, None)
    assert prepared is not None
    (model_spec,) = plan.main.models
    server = ModelServer(config, model_key(model_spec))
    server.check_health()
    outputs = server.predict(prepared, tags)
    delivered = stage.finish(spec, volume, prepared, None, outputs)
    settings = Settings.from_env().model_copy(
        update={"weights_dir": Path(str(config.weights)), "weights_uri": None}
    )
    reference = Segmenter(WeightsStore(settings), torch.device("cpu")).segment(
        load_volume(ct, LoadLimits.from_settings(settings)), options
    )
    assert delivered.body == multilabel_nifti_bytes(reference)
    assert delivered.media_type == "application/gzip"


def test_an_empty_crop_region_answers_zeros(config: ServeConfig, ct: bytes) -> None:
    options = SegmentOptions(fast=True, roi_subset=("liver",))
    plan = plan_run(options)
    stage = CpuStage(config)
    tags = Tags("total", "http")
    crop, main = passes(plan, options)
    spec = PassSpec((crop, main), 1, tags, Delivery())
    volume = stage.load(ct, tags, OutputOptions())
    empty = AfterPass(empty_segmentation(volume, main))  # after_pass's answer to an empty region
    assert stage.prepare(spec, volume, empty) is None
    assert stage.end_pass(spec, volume, None, empty) is empty  # passed on by a later crop pass
    delivered = stage.finish(spec, volume, None, empty)
    assert delivered.body is not None
    labels = np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(delivered.body)).dataobj)
    assert labels.shape == volume.shape
    assert not labels.any()


def test_an_answer_with_more_than_the_multilabel_file_is_the_exporters_files_zipped(
    config: ServeConfig, ct: bytes
) -> None:
    options = SegmentOptions(fast=True, roi_subset=("liver",))
    crop, main = passes(plan_run(options), options)
    stage = CpuStage(config)
    tags = Tags("total", "http")
    output = OutputOptions(ml=True, preview=True)
    spec = PassSpec((crop, main), 1, tags, Delivery(output))
    volume = stage.load(ct, tags, OutputOptions())
    empty = AfterPass(empty_segmentation(volume, main))
    delivered = stage.finish(spec, volume, None, empty)
    assert (delivered.media_type, delivered.filename) == ("application/zip", "total.zip")
    assert delivered.body is not None
    with zipfile.ZipFile(io.BytesIO(delivered.body)) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    assert members == dict(output_files(empty_segmentation(volume, main), volume, output))
    assert list(members) == ["segmentation.nii.gz", "preview_total.png"]


def test_device_guard_reports_a_cuda_fault() -> None:
    import torch

    class Failing:
        key = "x"

        def predict(self, item: Any) -> Any:
            raise ModelError("Model x failed: CUDA error: an illegal memory access was encountered")

        def on_device(self) -> bool:
            return True

    guard = _DeviceGuard(torch.device("cpu"))
    guard.check()
    prepared: Any = type("P", (), {"inputs": (type("I", (), {"model_key": "x"})(),)})()
    with pytest.raises(ModelError):
        guard.predict(Failing(), prepared, Tags("total", "http"))  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="failed earlier"):
        guard.check()
