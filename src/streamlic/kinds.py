"""The registry of layer kinds: per kind of the network table, its QAT module, integer layer, exported fields.

Every place that treats layers by kind reads this table: the model builds its modules with
``qat``, the integer model its layers with ``integer``, the exporter checks and stores the
``fields`` (and writes each one in the C type of its :data:`FIELD_FORMATS` width), the
hardware report names the layer ``report_kind`` and the bit-exactness harness divides a
module's output by ``integer_step``. Adding a layer kind is its module(s) plus one
:func:`register` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fixedpoint as fxp
from . import topology
from .config import HardwareConfig, SparsityConfig
from .integer_layers import BlockSparseRowConv, IntegerConv, IntegerLAGC, IntegerUpsampleConv
from .layers import LAGC, ChannelAddition, FGPConv2d, QConv2d, QLeakyReLU, QUpsampleConv2d

# format of an exported integer: the HardwareConfig width it is stored in (None: one bit), signed
FieldFormat = tuple[str | None, bool]
WEIGHT, BIAS, MULTIPLIER, SHIFT, MASK = (("weight_bits", True), ("precision_bits", True),
                                         ("multiplier_bits", False), ("shift_bits", False), (None, False))
CONV_FIELDS: dict[str, FieldFormat] = {"weight": WEIGHT, "bias": BIAS, "scale_param": MULTIPLIER,
                                       "scale_shift": SHIFT}
LAGC_FIELDS: dict[str, FieldFormat] = {
    "affine_weight": WEIGHT, "affine_bias": BIAS, "affine_scale_param": MULTIPLIER, "affine_scale_shift": SHIFT,
    "score_scale_param": MULTIPLIER, "score_scale_shift": SHIFT, "score_bias": BIAS,
    "output_scale_param": MULTIPLIER, "output_scale_shift": SHIFT}
FLOAT_FIELDS = ("float_input_scale", "float_output_scale")  # every weighted layer's real integer steps


@dataclass(frozen=True)
class IntegerContext:
    """What an integer layer is built with besides its own integers (``hw``: the layer's own widths)."""

    hw: HardwareConfig
    tanh_lut: Tensor
    input_bound: int  # the largest |integer| entering the layer
    context_engine: str = "sparse"  # how block-sparse layers are evaluated (IntegerModel's context_engine)


QATBuilder = Callable[[topology.LayerSpec, HardwareConfig, SparsityConfig], nn.Module]
IntegerBuilder = Callable[[topology.LayerSpec, dict[str, Tensor], IntegerContext], Callable]


@dataclass(frozen=True)
class LayerKind:
    """One kind of layer of the network table.

    ``fields``: the integers it exports, with their formats (empty: the layer holds none).
    ``integer_step``: the real value of one integer step of the QAT module's output (None:
    the layer is not compared, it only moves data). ``weight_field`` and ``convolved`` give
    the hardware report the weights it sums and the ``(out_channels, kernel)`` it convolves.
    """

    name: str
    qat: QATBuilder
    integer: IntegerBuilder
    fields: dict[str, FieldFormat]
    integer_step: Callable[[nn.Module], Tensor | float] | None = None
    report_kind: str | None = None
    weight_field: str = "weight"
    convolved: Callable[[topology.LayerSpec], tuple[int, tuple[int, int]]] = (
        lambda spec: (spec.out_channels, spec.kernel))
    geometry: topology.KindGeometry = topology.KindGeometry()  # its output size and MACs


KINDS: dict[str, LayerKind] = {}
FIELD_FORMATS: dict[str, FieldFormat] = {}  # every exported integer field of every registered kind


def register(kind: LayerKind) -> LayerKind:
    """Add a kind (its name is the ``kind`` of the network table's rows); refuses a name taken."""
    if kind.name in KINDS:
        raise ValueError(f"layer kind {kind.name!r} is already registered")
    if bool(kind.fields) != (kind.geometry.macs is not None):
        raise ValueError(f"layer kind {kind.name!r}: a kind with exported fields counts MACs, one without does not")
    for key, fmt in kind.fields.items():
        if key in FIELD_FORMATS and FIELD_FORMATS[key] != fmt:
            raise ValueError(f"layer kind {kind.name!r}: field {key} has format {fmt}, elsewhere {FIELD_FORMATS[key]}")
    KINDS[kind.name] = kind
    FIELD_FORMATS.update(kind.fields)
    topology.GEOMETRY[kind.name] = kind.geometry
    return kind


def unregister(name: str) -> None:
    """Remove a kind and the field formats only it used."""
    KINDS.pop(name)
    topology.GEOMETRY.pop(name)
    used = {key for kind in KINDS.values() for key in kind.fields}
    for key in [key for key in FIELD_FORMATS if key not in used]:
        del FIELD_FORMATS[key]


def kind_of(spec: topology.LayerSpec) -> LayerKind:
    try:
        return KINDS[spec.kind]
    except KeyError:
        raise KeyError(f"{spec.path}: no layer kind {spec.kind!r} is registered (streamlic.kinds)") from None


def field_bits(key: str, hw: HardwareConfig) -> tuple[int, bool]:
    """Width in bits and signedness of an exported integer field."""
    if key not in FIELD_FORMATS:
        raise KeyError(f"no format for parameter {key}")
    width, signed = FIELD_FORMATS[key]
    return (1 if width is None else getattr(hw, width)), signed


def build_qat(spec: topology.LayerSpec, hw: HardwareConfig, sp: SparsityConfig) -> nn.Module:
    """The QAT module of one row of the network table, at that layer's widths (``hw.for_layer``)."""
    return kind_of(spec).qat(spec, hw.for_layer(spec.path), sp)


def build_integer(spec: topology.LayerSpec, params: dict[str, Tensor], ctx: IntegerContext) -> Callable:
    """The integer layer of one row of the network table, from its exported integers."""
    return kind_of(spec).integer(spec, params, ctx)


# ---------------------------------------------------------------------------- the StreamLIC kinds
def _fixed(spec: topology.LayerSpec, hw: HardwareConfig) -> dict:
    """A layer's fixed output scale and its float-stage range (None for a learned scale)."""
    if not spec.fixed_scale:
        return {"fixed_scale": None, "float_range": None}
    return {"fixed_scale": hw.latent_scale,
            "float_range": fxp.fixed_scale_range(fxp.FLOAT_STAGE_HARDWARE, spec.role == "latent")}


def _latent_bounds(spec: topology.LayerSpec, hw: HardwareConfig) -> tuple[int | None, int | None]:
    bound = fxp.latent_bound(hw) if spec.role == "latent" else None
    return (None, None) if bound is None else (-bound, bound)


def _ep_bounds(spec: topology.LayerSpec, hw: HardwareConfig) -> tuple[Tensor | None, Tensor | None]:
    """Output clamps of the pdf-index layer: means in the activation range, scale indices in theirs."""
    if spec.role != "pdf_index":
        return None, None
    odd = topology.odd_channels(spec.out_channels).view(-1, 1, 1)
    lo = torch.where(odd, 0, -hw.act_max).to(torch.int64)
    hi = torch.where(odd, fxp.SCALE_INDEX_MAX, hw.act_max).to(torch.int64)
    return lo, hi


def _conv_step(module: QConv2d) -> Tensor:
    return module.output_scale_map()


register(LayerKind(
    topology.CONV,
    qat=lambda spec, hw, sp: QConv2d(spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.padding,
                                     hw=hw, out_bound=_latent_bounds(spec, hw)[1], **_fixed(spec, hw)),
    integer=lambda spec, p, ctx: IntegerConv(spec.path, p, ctx.hw, ctx.input_bound, spec.stride, spec.padding[0],
                                             *_latent_bounds(spec, ctx.hw)),
    fields=CONV_FIELDS, integer_step=_conv_step, report_kind="conv", geometry=topology.GEOMETRY[topology.CONV]))
register(LayerKind(
    topology.SPARSE,
    qat=lambda spec, hw, sp: FGPConv2d(spec.in_channels, spec.out_channels, spec.kernel, spec.padding, hw=hw,
                                       group_num=sp.group_num(spec.sparse, spec.in_channels, hw.block_in),
                                       pdf_index=spec.role == "pdf_index", **_fixed(spec, hw)),
    integer=lambda spec, p, ctx: BlockSparseRowConv(spec.path, p, ctx.hw, ctx.input_bound, spec.padding[1],
                                                    ctx.context_engine, *_ep_bounds(spec, ctx.hw)),
    fields={**CONV_FIELDS, "mask": MASK}, integer_step=_conv_step, report_kind="block_sparse_conv",
    geometry=topology.GEOMETRY[topology.SPARSE]))
register(LayerKind(
    topology.UPSAMPLE,
    qat=lambda spec, hw, sp: QUpsampleConv2d(spec.in_channels, spec.out_channels, hw, **_fixed(spec, hw)),
    integer=lambda spec, p, ctx: IntegerUpsampleConv(spec.path, p, ctx.hw, ctx.input_bound),
    fields=CONV_FIELDS, integer_step=_conv_step, report_kind="upsample_conv",
    convolved=lambda spec: (4 * spec.out_channels, spec.kernel),  # four sub-pixels before the shuffle
    geometry=topology.GEOMETRY[topology.UPSAMPLE]))
register(LayerKind(
    topology.LAGC,
    qat=lambda spec, hw, sp: LAGC(spec.out_channels, hw),
    integer=lambda spec, p, ctx: IntegerLAGC(spec.path, p, ctx.hw, ctx.tanh_lut, ctx.input_bound),
    fields=LAGC_FIELDS, integer_step=lambda module: module.out_scale, report_kind="lagc",
    weight_field="affine_weight", convolved=lambda spec: (spec.out_channels, (1, 1)),
    geometry=topology.GEOMETRY[topology.LAGC]))
register(LayerKind(
    topology.LEAKY, qat=lambda spec, hw, sp: QLeakyReLU(), integer=lambda spec, p, ctx: fxp.leaky_relu,
    fields={}, integer_step=lambda module: module.in_scale))
register(LayerKind(
    topology.CHANNEL_ADD, qat=lambda spec, hw, sp: ChannelAddition(hw, hw.latent_scale),
    integer=lambda spec, p, ctx: lambda a, b: fxp.channel_add(a, b, ctx.hw),
    fields={}, integer_step=lambda module: module.scale))
register(LayerKind(
    topology.PAD, qat=lambda spec, hw, sp: nn.ZeroPad2d(spec.pad),
    integer=lambda spec, p, ctx: lambda q: F.pad(q, spec.pad), fields={},
    geometry=topology.GEOMETRY[topology.PAD]))
register(LayerKind(  # the context model's padding slot (rows arrive padded)
    topology.SLOT, qat=lambda spec, hw, sp: nn.Identity(), integer=lambda spec, p, ctx: lambda q: q, fields={}))
