"""Model stage: one resident nnU-Net network turns a NetworkInput into labels.

The network is built once from plans.json with nnU-Net's ``get_network_from_plans``
(skipping nnU-Net's trainer-class search, which imports half of nnU-Net's training
stack) and handed to ``nnUNetPredictor.manual_initialization``. Prediction is nnU-Net's
own sliding window with TotalSegmentator's settings: Gaussian weighting, no mirroring,
the task's step size. When the logits are already on the output grid (TotalSegmentator
resampled the input itself), the argmax runs on the device and only uint8 labels leave
it; otherwise nnU-Net's own export resamples the logits first, exactly as in
TotalSegmentator.

Input and output are plain arrays plus small picklable records, so this stage can run
in a GPU actor while the stages around it run elsewhere.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from raytseg.config import check_device
from raytseg.errors import InvalidOptionError, ModelError, WeightsIntegrityError
from raytseg.pipeline.axes import from_network
from raytseg.pipeline.cropped_logits import labels_from_cropped_logits
from raytseg.pipeline.preprocess import ModelPlans
from raytseg.pipeline.records import CaseGeometry, NetworkInput, NetworkOutput

if TYPE_CHECKING:
    import torch

    from raytseg.pipeline.backends import Conversion, OpenVinoFeatures

log = logging.getLogger(__name__)


def select_device(name: str) -> torch.device:
    """TotalSegmentator's ``-d`` values: cpu, gpu, gpu:N, mps; no GPU falls back to CPU."""
    import torch

    try:
        check_device(name)
    except ValueError as exc:
        raise InvalidOptionError(f"Invalid {exc}.") from None
    if name == "cpu" or name == "mps":
        return torch.device(name)
    index = int(name[4:]) if ":" in name else 0
    if not torch.cuda.is_available():
        log.warning("No GPU detected; running on the CPU. --fast or --roi_subset keep this fast.")
        return torch.device("cpu")
    if index >= torch.cuda.device_count():
        log.warning("GPU %d does not exist; running on the CPU.", index)
        return torch.device("cpu")
    return torch.device(f"cuda:{index}")


def configure_torch(
    device: torch.device, *, threads: int | None = None, cudnn_autotune: bool = False
) -> None:
    """Process-wide torch settings: ``threads`` (default as TotalSegmentator sets them: all
    cores on CPU, 1 with CUDA) and cuDNN autotuning (``Settings.cudnn_autotune``).

    Called once by each entry point (CLI, serve replicas, batch actors), never inside a
    library call.
    """
    import os

    import torch

    if threads is None:
        threads = (os.cpu_count() or 1) if device.type == "cpu" else 1
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = cudnn_autotune


@dataclass(frozen=True)
class ModelFiles:
    """What the weights store hands the model stage: plans plus checkpoint paths."""

    plans: ModelPlans
    checkpoints: tuple[Path, ...]


class Network(Protocol):
    """A loaded network that predicts one network input: the model stage's one seam.

    ``LoadedModel`` (nnU-Net) is the real one; ``raytseg.testing.FakeNetwork`` stands in
    where a test is about what surrounds the network, not the network.
    """

    key: str

    def predict(self, item: NetworkInput) -> NetworkOutput: ...


class LoadedModel:
    """An nnU-Net network resident on one device, ready to predict."""

    def __init__(self, key: str, predictor: Any, device: torch.device) -> None:
        from raytseg.pipeline import sliding_window

        self.key = key
        self._predictor = predictor
        self.device = device
        patch = predictor.configuration_manager.patch_size
        self._lean_cpu_window = device.type == "cpu" and sliding_window.supports(predictor.network, patch)
        # Tiles per forward pass on a GPU; None runs nnU-Net's own loop (one tile at a time).
        self.tiles_per_pass: int | None = None
        self._openvino: OpenVinoFeatures | None = None  # the network converted (backend openvino)

    @classmethod
    def load(
        cls, files: ModelFiles, device: torch.device, conversion: Conversion | None = None
    ) -> LoadedModel:
        """Build the network from plans.json and load its weights (once); with a
        ``conversion``, also the OpenVINO model that runs it (backend openvino)."""
        parameters, checkpoint = _read_checkpoints(files)
        predictor = _build_predictor(files.plans, parameters, checkpoint, device)
        model = cls(files.plans.model_key, predictor, device)
        if conversion is not None:
            model._convert(conversion, files.checkpoints)
        return model

    @property
    def backend(self) -> str:
        """What runs the network: torch, or openvino."""
        return "torch" if self._openvino is None else "openvino"

    def _convert(self, conversion: Conversion, checkpoints: tuple[Path, ...]) -> None:
        predictor = self._predictor
        if not self._lean_cpu_window or len(predictor.list_of_parameters) > 1:
            log.warning("Model %s is not a single-fold 3D U-Net: it runs with torch, not openvino.", self.key)
            return
        patch = predictor.configuration_manager.patch_size
        self._openvino = conversion.compile(predictor.network, patch, checkpoints)
        _drop_converted_weights(predictor)

    def on_device(self) -> bool:
        """True when every weight the network computes with sits on ``self.device`` (a
        replica health check); weights that openvino computes instead are on no device."""
        weights = self._predictor.network.parameters()
        return all(p.device == self.device for p in weights if not p.is_meta)

    def predict(self, item: NetworkInput) -> NetworkOutput:
        """Sliding-window prediction of one input; returns labels in canonical voxel order."""
        import torch

        if item.model_key != self.key:
            raise ModelError(f"Input for {item.model_key} was sent to model {self.key}.")
        self._predictor.tile_step_size = item.step_size
        probabilities = None
        try:
            with torch.inference_mode():
                logits = self._logits(torch.from_numpy(item.data))
                if item.probabilities:
                    seg, probabilities = _export_with_probabilities(self._predictor, logits, item)
                else:
                    seg = self._labels(logits, item)
        except RuntimeError as exc:
            raise ModelError(f"Model {self.key} failed: {exc}") from exc
        labels = np.ascontiguousarray(from_network(seg).astype(np.uint8, copy=False))
        return NetworkOutput(self.key, item.chunk, labels, probabilities, backend=self.backend)

    def _lean_logits(self, data: torch.Tensor) -> torch.Tensor:
        from raytseg.pipeline import sliding_window

        if self._openvino is None:
            return sliding_window.predict_logits(self._predictor, data)
        with self._openvino.session() as features:
            return sliding_window.predict_logits(self._predictor, data, features)

    def _logits(self, data: torch.Tensor) -> torch.Tensor:
        from raytseg.pipeline import sliding_window

        predictor = self._predictor
        if len(predictor.list_of_parameters) > 1:  # nnU-Net averages folds, reloading each one's weights
            logits: torch.Tensor = predictor.predict_logits_from_preprocessed_data(data)
        elif self._lean_cpu_window:
            logits = self._lean_logits(data)
        elif self.tiles_per_pass is not None and self.device.type == "cuda":
            logits = sliding_window.predict_logits_on_device(predictor, data, self.tiles_per_pass)
        else:
            logits = predictor.predict_sliding_window_return_logits(data)
        return logits

    def _labels(self, logits: torch.Tensor, item: NetworkInput) -> np.ndarray:
        """Labels in network axes, on the whole (uncropped) input grid."""
        import torch

        predictor, geometry = self._predictor, item.geometry
        if tuple(logits.shape[1:]) == geometry.shape_after_cropping_and_before_resampling:
            # Same values as nnU-Net's numpy argmax (first maximum wins), but on the device.
            return _uncropped(logits.argmax(0).to(torch.uint8).cpu().numpy(), predictor, geometry)
        if item.cropped_logits:
            cropped = labels_from_cropped_logits(logits.cpu().numpy(), predictor, geometry)
            return _uncropped(cropped, predictor, geometry)
        return _export_with_resampling(predictor, logits, item)


def _uncropped(cropped: np.ndarray, predictor: Any, geometry: CaseGeometry) -> np.ndarray:
    """Labels of nnU-Net's cropped grid put back into the whole image, in network axes."""
    full = np.zeros(geometry.shape_before_cropping, dtype=np.uint8)
    full[tuple(slice(lo, hi) for lo, hi in geometry.bbox_used_for_cropping)] = cropped
    return full.transpose(predictor.plans_manager.transpose_backward)


def _export_with_resampling(predictor: Any, logits: torch.Tensor, item: NetworkInput) -> np.ndarray:
    """nnU-Net's export: resample logits to the input grid, argmax, un-crop, un-transpose."""
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )

    seg: np.ndarray = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.cpu().numpy(),
        predictor.plans_manager,
        predictor.configuration_manager,
        predictor.label_manager,
        item.geometry.as_nnunet_properties(),
    )
    return seg


def _export_with_probabilities(
    predictor: Any, logits: torch.Tensor, item: NetworkInput
) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's export with ``return_probabilities``, as TotalSegmentator's ``-sp`` runs it:
    the labels are then the argmax of the softmax, and the probabilities (float32, classes
    first) are un-cropped and un-transposed like them."""
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )

    seg, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.cpu().numpy(),
        predictor.plans_manager,
        predictor.configuration_manager,
        predictor.label_manager,
        item.geometry.as_nnunet_properties(),
        return_probabilities=True,
    )
    return seg, np.asarray(probabilities)


def _drop_converted_weights(predictor: Any) -> None:
    """Free the torch weights of what the converted network computes: all but the decoder's
    output layer, which the lean window applies itself. They are a second copy beside
    OpenVINO's (0.12 GB for each model of ``total``). Moved to the meta device, they keep
    their shapes and take no memory."""
    network = predictor.network
    for module in (network.encoder, network.decoder.stages, network.decoder.transpconvs):
        module.to("meta")
    predictor.list_of_parameters = [network.state_dict()]  # the old views held the weights


def _read_checkpoints(files: ModelFiles) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch

    parameters = []
    first: dict[str, Any] | None = None
    for path in files.checkpoints:
        try:
            # Checkpoints are pickles (nnU-Net saves numpy objects in them). The weights
            # store only hands out files from inside the configured weights folder.
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise WeightsIntegrityError(
                f"Cannot read checkpoint {path}: {exc}. Re-download the model (raytseg weights download)."
            ) from exc
        parameters.append(checkpoint["network_weights"])
        first = first or checkpoint
    if first is None:
        raise WeightsIntegrityError(f"No checkpoints listed for {files.plans.model_key}.")
    return parameters, first


def _build_predictor(
    plans: ModelPlans, parameters: list[dict[str, Any]], checkpoint: dict[str, Any], device: torch.device
) -> Any:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans.plans)
    configuration = checkpoint.get("init_args", {}).get("configuration", plans.configuration)
    config = manager.get_configuration(configuration)
    network = _network(plans, manager, config, parameters[0])
    network.to(device).eval()
    predictor = _predictor(device)
    if len(parameters) == 1:
        # One fold: the network already holds these weights; keep views of them instead
        # of a second copy (nnU-Net only re-reads the list when averaging several folds).
        parameters = [network.state_dict()]
    predictor.manual_initialization(
        network,
        manager,
        config,
        parameters,
        plans.dataset_json,
        checkpoint["trainer_name"],
        checkpoint.get("inference_allowed_mirroring_axes"),
    )
    return predictor


def _network(plans: ModelPlans, manager: Any, config: Any, weights: dict[str, Any]) -> Any:
    """The architecture plans.json names, holding ``weights``."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    network = get_network_from_plans(
        config.network_arch_class_name,
        config.network_arch_init_kwargs,
        config.network_arch_init_kwargs_req_import,
        determine_num_input_channels(manager, config, plans.dataset_json),
        manager.get_label_manager(plans.dataset_json).num_segmentation_heads,
        allow_init=False,
        deep_supervision=False,
    )
    try:
        network.load_state_dict(weights)
    except RuntimeError as exc:
        raise WeightsIntegrityError(
            f"Weights of {plans.model_key} do not match its plans.json: {exc}"
        ) from exc
    return network


def _predictor(device: torch.device) -> Any:
    """nnU-Net's predictor with TotalSegmentator's settings."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    # nnU-Net's constructor turns on cuDNN autotuning for the whole process; the process's
    # own choice (configure_torch) stands instead.
    autotune = torch.backends.cudnn.benchmark
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints a CPU notice here
        predictor = nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=False,  # TotalSegmentator never uses test-time mirroring
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            allow_tqdm=False,
        )
    torch.backends.cudnn.benchmark = autotune
    return predictor
