"""The model stage leaves the process's cuDNN choice alone (nnU-Net's predictor would not)."""

from __future__ import annotations

import pytest
import torch

from raytseg.config import Settings
from raytseg.pipeline.model import _predictor, configure_torch


@pytest.mark.parametrize("autotune", [False, True])
def test_building_a_gpu_predictor_keeps_the_process_cudnn_setting(autotune: bool) -> None:
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = autotune
        _predictor(torch.device("cuda"))  # nnU-Net's constructor sets benchmark=True for CUDA
        assert torch.backends.cudnn.benchmark is autotune
    finally:
        torch.backends.cudnn.benchmark = before


def test_entry_points_set_cudnn_autotuning_from_settings() -> None:
    before, threads = torch.backends.cudnn.benchmark, torch.get_num_threads()
    try:
        configure_torch(torch.device("cpu"), cudnn_autotune=True)
        assert torch.backends.cudnn.benchmark is True
        configure_torch(torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("on", True), ("false", False), ("0", False)])
def test_cudnn_autotune_setting_reads_the_environment(value: str, expected: bool) -> None:
    env = {"HOME": "/tmp", "RAYTSEG_CUDNN_AUTOTUNE": value}
    assert Settings.from_env(env).cudnn_autotune is expected
    assert Settings.from_env({"HOME": "/tmp"}).cudnn_autotune is False


def test_cudnn_autotune_setting_refuses_other_values() -> None:
    with pytest.raises(ValueError, match="cudnn_autotune"):
        Settings.from_env({"HOME": "/tmp", "RAYTSEG_CUDNN_AUTOTUNE": "sometimes"})
