"""The openvino backend: the same network converted once, cached, close to torch's logits."""

from __future__ import annotations

import logging
import sys
import weakref
from pathlib import Path

import pytest
import torch

from raytseg.batch.config import BatchConfig
from raytseg.errors import InvalidOptionError, MissingResourceError
from raytseg.pipeline import sliding_window
from raytseg.pipeline.backends import Conversion, OpenVinoFeatures, conversion_for, resolve
from raytseg.pipeline.model import LoadedModel
from raytseg.serve.config import load_config
from tests.unit.pipeline.test_sliding_window import fast_model_files, load_fast_model

pytest.importorskip("openvino")

CPU = torch.device("cpu")


def test_openvino_logits_are_torchs_within_float_rounding(tmp_path: Path) -> None:
    converted = load_fast_model(tmp_path / "weights", tiny=True, conversion=Conversion(tmp_path / "cache"))
    assert converted.backend == "openvino"
    openvino = converted._openvino
    assert openvino is not None
    data = torch.randn((1, 45, 70, 33), generator=torch.Generator().manual_seed(0))
    theirs = sliding_window.predict_logits(load_fast_model(tmp_path / "weights", tiny=True)._predictor, data)
    with openvino.session() as features:
        ours = sliding_window.predict_logits(converted._predictor, data, features)
    assert ours.dtype == theirs.dtype == torch.half
    difference = (ours.float() - theirs.float()).abs()
    # fp32 convolutions summed in another order; a few voxels of this tiny network's
    # near-degenerate instance norms differ more (measured: 3 per million above 0.01).
    assert difference.mean().item() < 1e-4
    assert (difference > 1e-2).float().mean().item() < 1e-4
    same = (ours.argmax(0) == theirs.argmax(0)).float().mean().item()
    assert same >= 0.999, f"{same:.4%} of the voxels keep their label"


def test_a_converted_model_keeps_only_the_torch_weights_it_computes_with(tmp_path: Path) -> None:
    converted = load_fast_model(tmp_path / "weights", tiny=True, conversion=Conversion(tmp_path / "cache"))
    network = converted._predictor.network
    kept = {name for name, p in network.named_parameters() if not p.is_meta}
    assert kept
    assert all(name.startswith("decoder.seg_layers.") for name in kept)
    # nnU-Net's list of weights holds no copy of the dropped ones either
    [weights] = converted._predictor.list_of_parameters
    assert {name for name, t in weights.items() if not t.is_meta} >= kept
    assert all(t.is_meta for name, t in weights.items() if name.startswith(("encoder.", "decoder.stages.")))
    assert converted.on_device()  # the health check looks at the weights it computes with


def test_a_conversion_is_cached_and_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="raytseg.pipeline.backends"):
        load_fast_model(tmp_path / "weights", tiny=True, conversion=Conversion(cache))
        load_fast_model(tmp_path / "weights", tiny=True, conversion=Conversion(cache))
    messages = [r.getMessage() for r in caplog.records if r.name == "raytseg.pipeline.backends"]
    assert ["converted" in m for m in messages] == [True, False]
    assert "read from the cache" in messages[1]
    [entry] = (cache / "openvino").iterdir()  # one model, no partial folder left
    assert sorted(p.name for p in entry.iterdir()) == ["features.bin", "features.xml"]


def test_other_weights_get_their_own_conversion(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    load_fast_model(tmp_path / "a", tiny=True, conversion=Conversion(cache))
    files = fast_model_files(tmp_path / "b", tiny=True)  # the same seeded weights: same key
    assert LoadedModel.load(files, CPU, Conversion(cache)).backend == "openvino"
    assert len(list((cache / "openvino").iterdir())) == 1
    [checkpoint] = files.checkpoints
    saved = torch.load(checkpoint, weights_only=False)
    saved["network_weights"] = {k: v + 0.01 for k, v in saved["network_weights"].items()}
    torch.save(saved, checkpoint)
    LoadedModel.load(files, CPU, Conversion(cache))
    assert len(list((cache / "openvino").iterdir())) == 2
    assert LoadedModel.load(files, CPU).backend == "torch"


def test_auto_is_torch_and_openvino_is_refused_on_a_gpu() -> None:
    assert resolve("auto", CPU) == "torch"
    assert resolve("auto", torch.device("cuda")) == "torch"
    assert resolve("openvino", CPU) == "openvino"
    with pytest.raises(InvalidOptionError, match="runs on the CPU"):
        resolve("openvino", torch.device("cuda"))
    with pytest.raises(InvalidOptionError, match="Unknown backend 'onnx'"):
        resolve("onnx", CPU)


def test_a_missing_openvino_is_said_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingResourceError, match=r"pip install 'raytseg\[openvino\]'"):
        conversion_for("openvino", CPU, tmp_path)
    assert conversion_for("torch", CPU, tmp_path) is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: load_config({"device": "gpu", "models": {"backend": "openvino"}}, {}),
        lambda: load_config({"device": "gpu", "pool": {"backend": "openvino"}}, {}),
        lambda: BatchConfig.load(None, {"input": "/a", "output": "/b", "backend": "openvino"}),
    ],
)
def test_configs_refuse_openvino_off_the_cpu(make: object) -> None:
    with pytest.raises(InvalidOptionError, match="backend openvino runs on the CPU"):
        make()  # type: ignore[operator]


def test_a_cpu_config_takes_openvino_per_deployment() -> None:
    config = load_config(
        {"device": "cpu", "models": {"num_gpus": 0, "backend": "openvino"}, "pool": {"num_gpus": 0}}, {}
    )
    assert (config.models.backend, config.pool.backend) == ("openvino", "auto")
    batch = BatchConfig.load(None, {"input": "/a", "output": "/b", "backend": "openvino", "device": "cpu"})
    assert batch.backend == "openvino"


class _Compiled:
    def create_infer_request(self) -> object:
        return _Request(self)


class _Request:
    def __init__(self, compiled: _Compiled) -> None:
        self.compiled = compiled  # as OpenVINO's requests keep their compiled network alive


class _Core:
    def __init__(self) -> None:
        self.compiled: list[weakref.ref[_Compiled]] = []

    def compile_model(self, model: object, device: str, config: object) -> _Compiled:
        compiled = _Compiled()
        self.compiled.append(weakref.ref(compiled))
        return compiled


def test_the_compiled_network_lives_only_while_a_session_is_open() -> None:
    core = _Core()
    network = OpenVinoFeatures(core, object(), {})
    with network.session():
        with network.session():
            pass
        [alive] = core.compiled  # both sessions share one compiled network
        assert alive() is not None  # another predict is still running
    assert alive() is None  # its buffers and repacked weights are gone
    with network.session():
        assert len(core.compiled) == 2  # compiled again for the next window
    assert core.compiled[1]() is None


def test_a_damaged_cached_model_is_converted_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    load_fast_model(tmp_path / "weights", tiny=True, conversion=Conversion(cache))
    [entry] = (cache / "openvino").iterdir()
    (entry / "features.bin").write_bytes(b"truncated")
    with caplog.at_level(logging.INFO, logger="raytseg.pipeline.backends"):
        model = load_fast_model(tmp_path / "weights", tiny=True, conversion=Conversion(cache))
    assert model.backend == "openvino"
    assert "does not load" in caplog.text
    assert (entry / "features.bin").stat().st_size > len(b"truncated")
