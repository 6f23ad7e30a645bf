"""The StreamLIC network as one table: each layer's path, kind, geometry and role (docs/architecture.md).

The float/QAT model builds its modules from this table, the integer model runs it, the
exporter names its files and counts its multiply-accumulates from it, and the codec pads
images with its strides. Paths are the research code's module paths (``g_a.0`` ...
``entropy_parameters.2``): the keys of every export.
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass
from functools import lru_cache

from typing import TYPE_CHECKING, Callable

from .formats import SYMBOL_MAX

if TYPE_CHECKING:
    from torch import Tensor

    from .config import HardwareConfig, ModelConfig

SUBNETWORKS = ("g_a", "h_a", "h_s", "g_s", "context_prediction", "entropy_parameters")
LATENT_STRIDE = 16  # image pixels per latent pixel (four stride-2 convolutions)
PAD_MULTIPLE = 64  # image pixels per hyper-latent pixel: images are padded to this multiple
HYPER_ANALYSIS_PAD = (1, 1, 2, 0)  # causal: left, right, top, bottom (what the streaming hardware computes)
CONTEXT_ROWS = 3  # a latent row is predicted from the three rows above it
CONTEXT_PAD = (1, 1, CONTEXT_ROWS, 0)  # left, right, top, bottom of the context model's input

# the block-sparse layers of the row engine, by their short names
CTX1, CTX2, EP = SPARSE_LAYERS = ("ctx1", "ctx2", "ep")

# kinds of layers (streamlic.kinds registers what each one is built from)
CONV, LAGC, UPSAMPLE, LEAKY, PAD, SLOT, CHANNEL_ADD, SPARSE = (
    "conv", "lagc", "upsample", "leaky", "pad", "slot", "channel_add", "sparse")


@dataclass(frozen=True)
class LayerSpec:
    """One layer of the network.

    ``out_channels`` of an upsampling layer is after the pixel shuffle (its 2x2 convolution
    has four times as many). ``fixed_scale`` layers output at the latent scale 2**-(A-8).
    ``role`` names the layers other parts of the project look up: ``latent`` (y),
    ``hyper_latent`` (z), ``hyper_output`` (the entropy parameters' hyper input) and
    ``pdf_index`` (ep, whose odd channels carry the scale index).
    """

    path: str
    kind: str
    in_channels: int = 0
    out_channels: int = 0
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)  # (height, width) of a convolution's zero padding
    fixed_scale: bool = False
    sparse: str | None = None  # ctx1, ctx2 or ep
    role: str | None = None
    pad: tuple[int, int, int, int] | None = None  # a padding layer's (left, right, top, bottom)

    @property
    def weighted(self) -> bool:
        """A layer with integer parameters in the exports (its kind counts MACs)."""
        return _geometry(self).macs is not None


def _conv(path, c_in, c_out, stride=2, padding=1, **kw) -> LayerSpec:
    return LayerSpec(path, CONV, c_in, c_out, (4, 4), stride, (padding, padding), **kw)


@lru_cache(maxsize=None)
def network(cfg: ModelConfig) -> dict[str, tuple[LayerSpec, ...]]:
    """The layers of each sub-network, in order (index = position in the module's ``nn.Sequential``)."""
    c1, c2, c3, m, n = cfg.c1, cfg.c2, cfg.c3, cfg.M, cfg.N
    return {
        "g_a": (_conv("g_a.0", 3, c1), LayerSpec("g_a.1", LAGC, c1, c1), _conv("g_a.2", c1, c2),
                LayerSpec("g_a.3", LAGC, c2, c2), _conv("g_a.4", c2, c3), LayerSpec("g_a.5", LAGC, c3, c3),
                _conv("g_a.6", c3, m, fixed_scale=True, role="latent")),
        "h_a": (LayerSpec("h_a.0", PAD, m, m, pad=HYPER_ANALYSIS_PAD), _conv("h_a.1", m, m, padding=0),
                LayerSpec("h_a.2", LAGC, m, m), _conv("h_a.3", m, n, fixed_scale=True, role="hyper_latent")),
        "h_s": (LayerSpec("h_s.0", UPSAMPLE, n, m, (2, 2)), LayerSpec("h_s.1", LEAKY, m, m),
                LayerSpec("h_s.2", UPSAMPLE, m, 2 * m, (2, 2), fixed_scale=True, role="hyper_output")),
        "g_s": (LayerSpec("g_s.0", UPSAMPLE, m, c3, (2, 2)), LayerSpec("g_s.1", LAGC, c3, c3),
                LayerSpec("g_s.2", UPSAMPLE, c3, c2, (2, 2)), LayerSpec("g_s.3", LAGC, c2, c2),
                LayerSpec("g_s.4", UPSAMPLE, c2, c1, (2, 2)), LayerSpec("g_s.5", LAGC, c1, c1),
                LayerSpec("g_s.6", UPSAMPLE, c1, 3, (2, 2))),
        # index 0 is the research code's padding slot: rows arrive padded (CONTEXT_PAD)
        "context_prediction": (LayerSpec("context_prediction.0", SLOT, m, m),
                               LayerSpec("context_prediction.1", SPARSE, m, 2 * m, (3, 3), sparse=CTX1),
                               LayerSpec("context_prediction.2", LEAKY, 2 * m, 2 * m),
                               LayerSpec("context_prediction.3", SPARSE, 2 * m, 2 * m, (1, 3), padding=(0, 1),
                                         fixed_scale=True, sparse=CTX2)),
        "entropy_parameters": (LayerSpec("entropy_parameters.0", CHANNEL_ADD, 4 * m, 2 * m),
                               LayerSpec("entropy_parameters.1", LEAKY, 2 * m, 2 * m),
                               LayerSpec("entropy_parameters.2", SPARSE, 2 * m, 2 * m, (1, 3), padding=(0, 1),
                                         fixed_scale=True, sparse=EP, role="pdf_index")),
    }


def layers(cfg: ModelConfig) -> tuple[LayerSpec, ...]:
    """Every layer of the network, sub-network by sub-network."""
    return tuple(spec for name in SUBNETWORKS for spec in network(cfg)[name])


def layer_with(cfg: ModelConfig, *, role: str | None = None, sparse: str | None = None) -> LayerSpec:
    """The one layer with this role (``latent``, ``hyper_output`` ...) or sparse name (``ctx1`` ...)."""
    found = [spec for spec in layers(cfg) if (role and spec.role == role) or (sparse and spec.sparse == sparse)]
    if len(found) != 1:
        raise KeyError(f"no single layer with role={role!r} sparse={sparse!r}")
    return found[0]


def sparse_paths(cfg: ModelConfig) -> dict[str, str]:
    """The block-sparse layers of the row engine: ``{"ctx1": "context_prediction.1", ...}``."""
    return {spec.sparse: spec.path for spec in layers(cfg) if spec.kind == SPARSE}


# what the first layer of each sub-network reads: the image, the hyper symbols or the latent grid
IMAGE, SYMBOLS, LATENT_GRID = "image", "symbols", "latent_grid"
_SUBNETWORK_INPUT = {"g_a": IMAGE, "h_a": LATENT_GRID, "h_s": SYMBOLS, "g_s": LATENT_GRID,
                     "context_prediction": LATENT_GRID, "entropy_parameters": LATENT_GRID}


# the table's paths and order are the same for every size: read from a network of one channel everywhere
_ANY_SIZES = namedtuple("Sizes", "c1 c2 c3 M N")(1, 1, 1, 1, 1)


@lru_cache(maxsize=None)
def producers() -> dict[str, str]:
    """For each layer that reads integers (the weighted ones and the channel addition), the layer whose
    requantized output it reads, or :data:`IMAGE`, :data:`SYMBOLS`, :data:`LATENT_GRID` (paths are the same
    for every size; LeakyReLUs and paddings pass their input's integers on)."""
    found = {}
    for name, specs in network(_ANY_SIZES).items():
        source = _SUBNETWORK_INPUT[name]
        for spec in specs:
            if spec.weighted or spec.kind == CHANNEL_ADD:
                found[spec.path], source = source, spec.path
    return found


def input_bound(spec: LayerSpec, hw: HardwareConfig) -> int:
    """The largest |integer| entering a layer: the image into ``g_a.0`` (at g_a.0's width), the 8-bit hyper
    symbols into ``h_s.0``, the latent grid's range into its readers, its producer's activation range elsewhere."""
    source = producers().get(spec.path)
    if source == IMAGE:
        return hw.for_layer(spec.path).image_max
    if source == SYMBOLS:
        return SYMBOL_MAX
    if source == LATENT_GRID:
        return hw.latent_hw.act_max
    return hw.act_max if source is None else hw.for_layer(source).act_max


def row_engine_paths(cfg: ModelConfig) -> dict[str, str]:
    """The row engine's tensors under their module paths: ctx1, its LeakyReLU, ctx2, the channel addition,
    its LeakyReLU, ep."""
    context, entropy = network(cfg)["context_prediction"], network(cfg)["entropy_parameters"]
    return {CTX1: context[1].path, "ctx1_act": context[2].path, CTX2: context[3].path,
            "summed": entropy[0].path, "summed_act": entropy[1].path, EP: entropy[2].path}


def context_buffer(like: Tensor, height: int, width: int) -> Tensor:
    """Zeros [B, C, height + CONTEXT_ROWS, width + 2] (``like``'s batch, channels, dtype, device): the decoded
    latent rows with the context model's padding (:data:`CONTEXT_PAD`) around them."""
    left, right, top, bottom = CONTEXT_PAD
    return like.new_zeros(like.shape[0], like.shape[1], height + top + bottom, width + left + right)


def context_window(buffer: Tensor, row: int) -> Tensor:
    """The padded rows above latent row ``row``: the context model's input for it."""
    return buffer[:, :, row:row + CONTEXT_ROWS]


def context_interior(buffer: Tensor, row: int | None = None) -> Tensor:
    """Latent row ``row`` inside the padded buffer (all rows when ``row`` is None), a view to write or read."""
    left, right, top, _ = CONTEXT_PAD
    rows = slice(top, None) if row is None else slice(top + row, top + row + 1)
    return buffer[:, :, rows, left:buffer.shape[-1] - right]


def density(active: int | float, total: int | float) -> float:
    """The fraction of a block-sparse layer kept: active blocks (or MACs) over all of them."""
    return active / total


def padded_size(height: int, width: int) -> tuple[int, int]:
    """An image size rounded up to the multiple of :data:`PAD_MULTIPLE` the network codes."""
    return math.ceil(height / PAD_MULTIPLE) * PAD_MULTIPLE, math.ceil(width / PAD_MULTIPLE) * PAD_MULTIPLE


def pad_to_multiple(x: Tensor, multiple: int = PAD_MULTIPLE) -> Tensor:
    """Pad an image ``[..., H, W]`` at the bottom and right by edge replication to multiples of ``multiple``.

    Replication (not zeros) keeps the padded border as cheap to code as the image edge; the
    decoder crops it away.
    """
    import torch.nn.functional as F  # noqa: N812 - here, not at the top: train.py's start reads this module

    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


def same_size(spec: LayerSpec, height: int, width: int) -> tuple[int, int]:
    return height, width


def strided_positions(spec: LayerSpec, height: int, width: int) -> tuple[int, int]:
    """Output positions of a convolution with the spec's kernel, stride and zero padding."""
    (kh, kw), (ph, pw) = spec.kernel, spec.padding
    return (height + 2 * ph - kh) // spec.stride + 1, (width + 2 * pw - kw) // spec.stride + 1


@dataclass(frozen=True)
class KindGeometry:
    """What a kind of layer does to its input's size and what one output position costs.

    The network table's kinds have theirs in :data:`GEOMETRY`, where the functions below (which
    need no torch) read it; a new kind brings its own with its :mod:`streamlic.kinds` entry.
    """

    positions: Callable[[LayerSpec, int, int], tuple[int, int]] = same_size  # output positions it computes
    output: Callable[[LayerSpec, int, int], tuple[int, int]] | None = None  # output size, if not the positions
    macs: Callable[[LayerSpec], int] | None = None  # dense MACs of one output position (None: no weights)


def _weights_per_position(spec: LayerSpec) -> int:
    """A convolution's MACs per output position: its weights."""
    (kh, kw) = spec.kernel
    return spec.out_channels * spec.in_channels * kh * kw


_CONV_GEOMETRY = KindGeometry(strided_positions, macs=_weights_per_position)

# By kind: the network table's own kinds here (torch-free, usable before any model is built);
# streamlic.kinds.register adds a new kind's entry.
GEOMETRY: dict[str, KindGeometry] = {
    CONV: _CONV_GEOMETRY,
    SPARSE: _CONV_GEOMETRY,
    # the 2x2 convolution runs on the input padded by 1, at (h+1) x (w+1) positions; the shuffle doubles the size
    UPSAMPLE: KindGeometry(lambda spec, h, w: (h + 1, w + 1), lambda spec, h, w: (2 * h, 2 * w),
                           lambda spec: 4 * _weights_per_position(spec)),
    # C^2 affine weights plus 2C for the gain and output products
    LAGC: KindGeometry(macs=lambda spec: spec.in_channels * spec.out_channels + 2 * spec.out_channels),
    LEAKY: KindGeometry(),
    CHANNEL_ADD: KindGeometry(),
    PAD: KindGeometry(lambda spec, h, w: (h + spec.pad[2] + spec.pad[3], w + spec.pad[0] + spec.pad[1])),
    SLOT: KindGeometry(),
}


def _geometry(spec: LayerSpec) -> KindGeometry:
    try:
        return GEOMETRY[spec.kind]
    except KeyError:
        raise KeyError(f"{spec.path}: no layer kind {spec.kind!r} is registered (streamlic.kinds)") from None


def conv_positions(spec: LayerSpec, height: int, width: int) -> tuple[int, int]:
    """Output positions (rows, columns) of a layer for an input of ``height x width``.

    An upsampling layer's 2x2 convolution runs on its input padded by 1, at ``(h+1) x (w+1)``
    positions before the pixel shuffle; its output is then ``2h x 2w``.
    """
    return _geometry(spec).positions(spec, height, width)


def output_size(spec: LayerSpec, height: int, width: int) -> tuple[int, int]:
    """Output size of a layer for an input of ``height x width``."""
    geometry = _geometry(spec)
    return (geometry.output or geometry.positions)(spec, height, width)


def macs_per_position(spec: LayerSpec, active_weights: int | None = None) -> int:
    """Multiply-accumulates of one output position: a convolution's weights (the active ones if
    given), an LAGC's ``C^2`` affine weights plus ``2C`` for its gain and output products."""
    return _geometry(spec).macs(spec) if active_weights is None else active_weights


def layer_geometry(cfg: ModelConfig, height: int, width: int) -> dict[str, tuple[int, int]]:
    """Output positions (rows, columns) of every weighted layer for a ``height x width`` image.

    The row engine's layers run once per latent position.
    """
    geometry: dict[str, tuple[int, int]] = {}
    net = network(cfg)
    size = (height, width)
    for name in ("g_a", "h_a", "h_s"):
        for spec in net[name]:
            if spec.weighted:
                geometry[spec.path] = conv_positions(spec, *size)
            size = output_size(spec, *size)
        if name == "g_a":
            latent = size
    size = latent
    for spec in net["g_s"]:
        if spec.weighted:
            geometry[spec.path] = conv_positions(spec, *size)
        size = output_size(spec, *size)
    for path in sparse_paths(cfg).values():
        geometry[path] = latent
    return geometry


def odd_channels(channels: int) -> Tensor:
    """Mask of ep's odd output channels, which carry the scale index."""
    import torch

    return torch.arange(channels) % 2 == 1


# Layers other parts look up, as plain values (paths are the same for every size; compiled code reads them
# without tracing a lookup): those whose output is on the latent grid (the fixed_scale ones: y, z, the hyper
# output, ctx2, ep), whose width is the latent grid's; the one reading the image, whose width sets the image's
# integer range; ep, which writes mu and sets the latent grid's width unless hardware.latent_bits does.
LATENT_GRID_WRITERS = tuple(spec.path for spec in layers(_ANY_SIZES) if spec.fixed_scale)
IMAGE_READER = next(path for path, source in producers().items() if source == IMAGE)
PDF_INDEX_LAYER = next(spec.path for spec in layers(_ANY_SIZES) if spec.role == "pdf_index")
