"""The segmentation network of ifi-seg, built from its metadata (no code in the weights file).

Architecture: MONAI ``UNet`` with anisotropic strides. Axial hip MRI has fine in-plane pixels
(0.5-1 mm) and thick slices (3-6 mm); the working grid is ~1 x 1 x 4 mm (see
``pipeline.grid``), so the first level downsamples in-plane only (stride (2, 2, 1)) and the
deeper levels isotropically. Measured on 2 CPU cores this is the fastest of the MONAI nets we
tried (shared/notes/cpu-performance.md) while keeping in-plane detail for the small lesser
trochanter.
"""
from __future__ import annotations

import copy

import torch

#: Default architecture description; stored verbatim in every bundle's metadata.
DEFAULT_ARCHITECTURE: dict = {
    "name": "UNet",
    "spatial_dims": 3,
    "channels": [16, 32, 64, 128],
    "strides": [[2, 2, 1], [2, 2, 2], [2, 2, 2]],
    "num_res_units": 2,
    # batch norm, not instance norm: at inference the whole volume goes through in one pass
    # (fastest on CPU), and per-image instance statistics of a whole volume (mostly air) would
    # differ from those of the training patches; BN's running statistics do not.
    "norm": "batch",
    "dropout": 0.0,
}


def divisor(architecture: dict) -> tuple[int, int, int]:
    """Per-axis factor the input size must be a multiple of (product of the strides)."""
    out = [1, 1, 1]
    for s in architecture["strides"]:
        s = [s] * 3 if isinstance(s, int) else list(s)
        out = [a * int(b) for a, b in zip(out, s)]
    return tuple(out)  # type: ignore[return-value]


def build_network(architecture: dict | None, in_channels: int, out_channels: int) -> torch.nn.Module:
    """Instantiate the network described by ``architecture`` (a metadata dict).

    Only architectures this module knows can be built: a bundle is data, never code.
    """
    from monai.networks.nets import UNet

    arch = copy.deepcopy(architecture or DEFAULT_ARCHITECTURE)
    if arch.get("name") != "UNet":
        raise ValueError(f"unknown architecture {arch.get('name')!r} (this version builds 'UNet')")
    return UNet(
        spatial_dims=int(arch.get("spatial_dims", 3)),
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        channels=tuple(int(c) for c in arch["channels"]),
        strides=tuple(tuple(int(v) for v in s) if not isinstance(s, int) else int(s) for s in arch["strides"]),
        num_res_units=int(arch.get("num_res_units", 2)),
        norm=arch.get("norm", "instance"),
        dropout=float(arch.get("dropout", 0.0)),
    )


def bf16_native(device) -> bool:
    """Whether ``device`` runs bfloat16 natively: a GPU, or a CPU whose oneDNN has bfloat16
    kernels (AVX-512 BF16 / AMX). Elsewhere bfloat16 autocast is emulated and far slower than
    float32 (a training step of 2 x 128 x 128 x 16 patches on 2 AVX2 cores: 55 s against 2 s)."""
    if torch.device(device).type == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def memory_layout(device, bf16: bool):
    """The tensor memory format to run the network in: channels-last (NDHWC) in float32 on a
    CPU, where oneDNN's 3D convolutions then skip their layout conversions (2 AVX2 cores: network
    3.18 -> 2.55 s and peak 1.88 -> 1.50 GB on a 384 x 384 x 40 working grid, a training step of
    2 x 128 x 128 x 16 patches 0.95 -> 0.81 s, logits equal to 5e-5); the plain layout with
    bfloat16 or on a GPU, where it was not measured."""
    return (torch.channels_last_3d if torch.device(device).type == "cpu" and not bf16
            else torch.contiguous_format)
