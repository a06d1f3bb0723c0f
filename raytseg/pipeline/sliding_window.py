"""nnU-Net's sliding window, re-housed: lean on the CPU, several tiles per pass on a GPU.

**CPU** (``predict_logits``): the output layer fused into the accumulation.

Same tiles, same order, same Gaussian, same fp16 accumulation as
``nnUNetPredictor.predict_sliding_window_return_logits`` on a CPU, so the logits are
bit-identical. What differs is memory: nnU-Net materialises each tile's full fp32 output
(118 classes x 112x112x128 = 0.76 GB for TotalSegmentator's 3 mm model) and still holds the
previous tile's while computing the next, and oneDNN adds a layout-conversion copy. Here
the network runs up to its last decoder stage, and the final 1x1x1 convolution is applied
slab by slab straight into the accumulator. A pointwise convolution computes every voxel
independently and the Gaussian weighting is elementwise, so slabs change no value; on a
realistic CT this cuts the peak of ``--fast`` by about 1.5 GB
(``tests/unit/pipeline/test_sliding_window.py`` checks equality with nnU-Net's loop).

Used only for single-fold 3D models whose network is a dynamic-network-architectures
U-Net (every TotalSegmentator model); everything else uses nnU-Net's predictor.

**GPU** (``predict_logits_on_device``): nnU-Net's device loop (fp16 autocast, fp16
accumulators, the same tile order and Gaussian), but ``tiles`` tiles go through the network
in one forward pass. The accumulation is unchanged; only the convolutions see a larger
batch, for which cuDNN may pick other algorithms, so outputs can differ in the last bits
of fp16: ``bench/gpu/run.py`` measures that against nnU-Net's loop before it is used.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from raytseg.errors import ModelError

SLABS = 8


def supports(network: Any, patch_size: Sequence[int]) -> bool:
    """True for 3D U-Nets whose forward is encoder -> decoder -> last 1x1x1 seg layer."""
    decoder = getattr(network, "decoder", None)
    if len(patch_size) != 3 or decoder is None or not hasattr(network, "encoder"):
        return False
    if getattr(decoder, "deep_supervision", True) or not hasattr(decoder, "transpconvs"):
        return False
    head = decoder.seg_layers[-1]
    return isinstance(head, torch.nn.Conv3d) and tuple(head.kernel_size) == (1, 1, 1)


@torch.inference_mode()
def decoder_features(network: Any, tile: torch.Tensor) -> torch.Tensor:
    """The input of the last seg layer: dynamic-network-architectures' UNetDecoder.forward
    without deep supervision, stopped before its final 1x1x1 convolution."""
    skips = network.encoder(tile)
    decoder = network.decoder
    lres = skips[-1]
    for s, stage in enumerate(decoder.stages):
        x = decoder.transpconvs[s](lres)
        x = torch.cat((x, skips[-(s + 2)]), 1)
        lres = stage(x)
    features: torch.Tensor = lres
    return features


@torch.inference_mode()
def predict_logits(
    predictor: Any, data: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """fp16 logits (classes, *spatial) of ``data`` (channels, *spatial), as nnU-Net computes
    them; ``features``: what computes a tile's ``decoder_features`` (default: the network)."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    network = predictor.network
    head = network.decoder.seg_layers[-1]
    patch = tuple(predictor.configuration_manager.patch_size)
    padded, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    logits = torch.zeros((head.out_channels, *padded.shape[1:]), dtype=torch.half)
    counts = torch.zeros(padded.shape[1:], dtype=torch.half)
    cpu = torch.device("cpu")
    gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=cpu)
    features = features or functools.partial(decoder_features, network)
    for sl in predictor._internal_get_sliding_window_slicers(padded.shape[1:]):
        tile = torch.clone(padded[sl][None], memory_format=torch.contiguous_format)
        _accumulate(head, features(tile), gaussian, logits[sl])
        counts[sl[1:]] += gaussian
    torch.div(logits, counts, out=logits)
    if torch.any(torch.isinf(logits)):
        raise ModelError("The network produced infinite logits (fp16 overflow); the weights look broken.")
    return logits[(slice(None), *revert[1:])]


def _accumulate(
    head: torch.nn.Conv3d, features: torch.Tensor, gaussian: torch.Tensor, target: torch.Tensor
) -> None:
    """target += head(features) * gaussian, one slab of the last axis at a time."""
    depth = features.shape[-1]
    step = -(-depth // SLABS)
    for start in range(0, depth, step):
        stop = min(start + step, depth)
        part = head(features[..., start:stop])[0]
        part *= gaussian[..., start:stop]
        target[..., start:stop] += part


@torch.inference_mode()
def predict_logits_on_device(predictor: Any, data: torch.Tensor, tiles: int) -> torch.Tensor:
    """fp16 logits of ``data`` on the predictor's device, ``tiles`` tiles per forward pass."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    device = predictor.device
    patch = tuple(predictor.configuration_manager.patch_size)
    heads = predictor.label_manager.num_segmentation_heads
    # Autocast only on CUDA, as nnU-Net does (on a CPU it would mean bfloat16).
    with torch.autocast(device.type, enabled=True) if device.type == "cuda" else contextlib.nullcontext():
        padded, revert = pad_nd_image(data.to(device), patch, "constant", {"value": 0}, True, None)
        slicers = predictor._internal_get_sliding_window_slicers(padded.shape[1:])
        logits = torch.zeros((heads, *padded.shape[1:]), dtype=torch.half, device=device)
        counts = torch.zeros(padded.shape[1:], dtype=torch.half, device=device)
        gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=device)
        for start in range(0, len(slicers), tiles):
            group = slicers[start : start + tiles]
            batch = torch.stack([padded[sl] for sl in group])
            for sl, prediction in zip(group, predictor.network(batch), strict=True):
                prediction *= gaussian
                logits[sl] += prediction
                counts[sl[1:]] += gaussian
        torch.div(logits, counts, out=logits)
    if torch.any(torch.isinf(logits)):
        raise ModelError("The network produced infinite logits (fp16 overflow); the weights look broken.")
    return logits[(slice(None), *revert[1:])]
