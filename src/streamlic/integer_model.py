"""The integer reference model (DESIGN §6) and the bit-exactness harness.

:class:`IntegerModel` runs StreamLIC from exported integers alone: no float weight enters
it. Every tensor it computes is an int64 tensor, and every fixed-point rule comes from
:mod:`streamlic.fixedpoint`. Convolution sums are formed in float64, which is exact because
the constructor checks that no layer's worst-case sum reaches 2**53.

It is the golden model of the hardware and the codec's decoder: ``analysis`` → ``encode_rows``
on the encoder side, ``hyper_synthesis`` → ``decode_rows`` → ``synthesis`` on the decoder
side. The autoregressive engine predicts a whole latent row at once from the three rows
above it, and its block-sparse layers compute only their active (input group, tap) blocks,
so its cost follows the sparse MAC count.

:func:`compare_with_qat` runs the QAT model in float64 next to the integer model and reports,
layer by layer, how many integers differ.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fixedpoint as fxp
from .config import HardwareConfig, ModelConfig
from .layers import LAGC, ChannelAddition, QConv2d, QLeakyReLU

if TYPE_CHECKING:
    from .model import StreamLIC

log = logging.getLogger(__name__)

PAD_MULTIPLE = 64  # g_a and h_a downsample by 64 in all
NO_CLAMP = 2**62  # an output "bound" no int64 value of the datapath reaches: the value before a clamp
HASH_FORMAT = 1
FLOAT64_EXACT = 2**53

# The network as the hardware computes it: (layer name, kind, stride, padding) in order.
# Names are the StreamLIC module names of the quantized layers (the keys of the exports).
ANALYSIS = (("g_a.0", "conv", 2, 1), ("g_a.1", "lagc", 1, 0), ("g_a.2", "conv", 2, 1), ("g_a.3", "lagc", 1, 0),
            ("g_a.4", "conv", 2, 1), ("g_a.5", "lagc", 1, 0), ("g_a.6", "latent", 2, 1))
HYPER_ANALYSIS = (("h_a.1", "conv", 2, 0), ("h_a.2", "lagc", 1, 0), ("h_a.3", "conv", 2, 1))
HYPER_ANALYSIS_PAD = (1, 1, 2, 0)  # causal: left, right, top, bottom
HYPER_SYNTHESIS = (("h_s.0", "upsample", 1, 0), ("h_s.1", "leaky", 1, 0), ("h_s.2", "upsample", 1, 0))
SYNTHESIS = (("g_s.0", "upsample", 1, 0), ("g_s.1", "lagc", 1, 0), ("g_s.2", "upsample", 1, 0),
             ("g_s.3", "lagc", 1, 0), ("g_s.4", "upsample", 1, 0), ("g_s.5", "lagc", 1, 0),
             ("g_s.6", "upsample", 1, 0))
# The block-sparse layers of the autoregressive engine: short name -> module name.
CONTEXT_LAYERS = {"ctx1": "context_prediction.1", "ctx2": "context_prediction.3", "ep": "entropy_parameters.2"}
CONTEXT_WIDTH_PADDING = {"ctx1": 0, "ctx2": 1, "ep": 1}
LAGC_KEYS = ("affine_weight", "affine_bias", "affine_scale_param", "affine_scale_shift", "score_scale_param",
             "score_scale_shift", "score_bias", "output_scale_param", "output_scale_shift")
CONV_KEYS = ("weight", "bias", "scale_param", "scale_shift")
FLOAT_KEYS = ("float_input_scale", "float_output_scale")
CONTEXT_ENGINES = ("sparse", "dense")


class StageError(ValueError):
    """A model is not at a stage where its integers are defined (QAT or later)."""


def require_integer_stage(model: "StreamLIC", what: str) -> None:
    """Refuse a model whose scales were never frozen or whose quantization is off."""
    if not (model.scales_frozen and model.quantized):
        raise StageError(
            f"{what}: the model is at stage '{model.stage}' (quantization {'on' if model.quantized else 'off'}, "
            f"scales {'frozen' if model.scales_frozen else 'not frozen'}); integer parameters exist from stage 3 "
            "(QAT, toggle_quantization(True)) on — export a QAT-or-later checkpoint")


def pad_to_multiple(x: Tensor, multiple: int = PAD_MULTIPLE) -> Tensor:
    """Pad an image ``[..., H, W]`` at the bottom and right by edge replication to multiples of ``multiple``.

    Replication (not zeros) keeps the padded border as cheap to code as the image edge; the
    decoder crops it away.
    """
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


def _as_int64(t: Tensor) -> Tensor:
    return t.detach().cpu().to(torch.int64)


def _channel(t: Tensor) -> Tensor:
    """Per-output-channel vector shaped to broadcast against [B, C, H, W]."""
    return t.reshape(-1, 1, 1)


def _accumulate(q: Tensor, weight: Tensor, stride: int = 1, padding=0) -> Tensor:
    """Exact ``sum(q_in * q_w)`` of a convolution (float64 sums of integers below 2**53).

    Every partial sum is an integer below 2**53, so any summation order gives the same
    exact result; the layout is chosen for speed only. A stride-2 convolution with an even
    kernel becomes a stride-1 one on the space-to-depth input (``pixel_unshuffle``), and
    stride-1 convolutions run as one matrix product per kernel tap (below), which is
    several times faster on a CPU than float64 ``conv2d`` for thin layers.
    """
    x = q.to(torch.float64)
    if padding:
        pad_h, pad_w = (padding, padding) if isinstance(padding, int) else padding
        x = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
    out_c, in_c, kh, kw = weight.shape
    if stride == 2 and kh % 2 == kw % 2 == x.shape[2] % 2 == x.shape[3] % 2 == 0:
        # x_pad[2r + a, 2c + b] with a = 2a' + i, b = 2b' + j is channel (i, j) of the
        # unshuffled input at (r + a', c + b')
        x = F.pixel_unshuffle(x, 2)
        weight = (weight.reshape(out_c, in_c, kh // 2, 2, kw // 2, 2).permute(0, 1, 3, 5, 2, 4)
                  .reshape(out_c, 4 * in_c, kh // 2, kw // 2))
    elif stride != 1:
        return F.conv2d(x, weight, None, stride).to(torch.int64)
    return _accumulate_by_taps(x, weight)


def _accumulate_by_taps(x: Tensor, weight: Tensor) -> Tensor:
    """Stride-1, unpadded convolution as ``sum over taps of W[:, :, i, j] @ x shifted by (i, j)``.

    The image is flattened row-major, so the input of tap (i, j) for every output pixel is
    one contiguous slice starting at ``i * width + j``; the last ``kw - 1`` columns of each
    output row wrap around the image edge and are cropped.
    """
    batch, in_c, height, width = x.shape
    out_c, _, kh, kw = weight.shape
    out_h, out_w = height - kh + 1, width - kw + 1
    span = (out_h - 1) * width + out_w
    flat = x.reshape(batch, in_c, height * width)
    taps = weight.permute(2, 3, 0, 1).contiguous()
    acc = x.new_empty(batch, out_c, out_h * width)
    for b in range(batch):
        out = acc[b, :, :span]
        for i in range(kh):
            for j in range(kw):
                shifted = flat[b, :, i * width + j:i * width + j + span]
                if i == 0 and j == 0:
                    torch.mm(taps[i, j], shifted, out=out)
                else:
                    out.addmm_(taps[i, j], shifted)
    return acc.view(batch, out_c, out_h, width)[..., :out_w].to(torch.int64)


class _Conv:
    """One requantized convolution: float64 integer weights, int64 multipliers, shifts and biases."""

    def __init__(self, name: str, p: dict[str, Tensor], hw: HardwareConfig, in_bound: int,
                 stride: int = 1, padding=0, lo: Tensor | int | None = None, hi: Tensor | int | None = None):
        self.name, self.hw, self.stride, self.padding = name, hw, stride, padding
        self.weight = p["weight"].to(torch.float64)
        self.m, self.k = _channel(_as_int64(p["scale_param"])), _channel(_as_int64(p["scale_shift"]))
        self.bias = _channel(_as_int64(p["bias"]))
        self.lo, self.hi = lo, hi
        _check_float64_exact(name, self.weight, in_bound)

    def requantize(self, acc: Tensor, clamped: bool = True) -> Tensor:
        """The output integers of an accumulator; ``clamped=False`` gives them before the output clamp."""
        lo, hi = (self.lo, self.hi) if clamped else (-NO_CLAMP, NO_CLAMP)
        return fxp.requantize(acc, self.m, self.k, self.bias, self.hw, lo, hi)

    def accumulate(self, q: Tensor) -> Tensor:
        return _accumulate(q, self.weight, self.stride, self.padding)

    def __call__(self, q: Tensor) -> Tensor:
        return self.requantize(self.accumulate(q))


class _UpsampleConv(_Conv):
    """Pad 1, 2x2 conv to 4*C channels, pixel-shuffle x2, crop 1 pixel on every side."""

    def __call__(self, q: Tensor) -> Tensor:
        out = super().__call__(F.pad(q, (1, 1, 1, 1)))
        return F.pixel_shuffle(out, 2)[:, :, 1:-1, 1:-1]


class _LAGC:
    """Integer LAGC: affine conv to the tanh input scale, tanh table, per-channel gain, floor-shift product."""

    def __init__(self, name: str, p: dict[str, Tensor], hw: HardwareConfig, tanh_lut: Tensor):
        self.name, self.hw, self.tanh_lut = name, hw, tanh_lut
        self.affine = _Conv(name + ".affine", {"weight": p["affine_weight"], "bias": p["affine_bias"],
                                               "scale_param": p["affine_scale_param"],
                                               "scale_shift": p["affine_scale_shift"]}, hw, hw.act_max)
        self.m_g, self.k_g = _channel(_as_int64(p["score_scale_param"])), _channel(_as_int64(p["score_scale_shift"]))
        self.b_g = _channel(_as_int64(p["score_bias"]))
        self.m_o, self.k_o = _channel(_as_int64(p["output_scale_param"])), _channel(_as_int64(p["output_scale_shift"]))

    def __call__(self, q: Tensor) -> Tensor:
        t = fxp.tanh_lookup(self.affine(q), self.tanh_lut)
        gain = fxp.lagc_gain(t, self.m_g, self.k_g, self.b_g, self.hw)
        return fxp.lagc_output(q, gain, self.m_o, self.k_o, self.hw)


class _BlockSparseRowConv(_Conv):
    """A block-sparse conv over one latent row, computing only the active blocks.

    The input row set ``[B, C_in, kh, w + 2*pad]`` is cut into one ``[PI, w]`` slab per
    (tap, input group); each output group gathers the slabs of its active blocks and
    multiplies them with its blocks' weights, concatenated: ``[PO, blocks*PI] @ [blocks*PI, w]``.
    Groups with fewer active blocks than the largest group are filled with zero blocks.
    """

    def __init__(self, name: str, p: dict[str, Tensor], hw: HardwareConfig, in_bound: int, width_padding: int,
                 engine: str, lo=None, hi=None):
        super().__init__(name, p, hw, in_bound, 1, (0, width_padding), lo, hi)
        self.engine = engine
        self.width_padding = width_padding
        weight = self.weight
        out_c, in_c, kh, kw = weight.shape
        pi, po = hw.block_in, hw.block_out
        self.taps = [(i, j) for i in range(kh) for j in range(kw)]
        self.in_groups, self.out_groups = in_c // pi, out_c // po
        blocks = block_mask(p["mask"], pi, po)  # [out_groups, in_groups, kh, kw]
        per_group = [[(tap, ig) for tap, (i, j) in enumerate(self.taps) for ig in range(self.in_groups)
                      if blocks[g, ig, i, j]] for g in range(self.out_groups)]
        width = max(1, max(len(active) for active in per_group))
        index = torch.zeros(self.out_groups, width, dtype=torch.int64)
        packed = torch.zeros(self.out_groups, po, width, pi, dtype=torch.float64)
        for g, active in enumerate(per_group):
            for slot, (tap, ig) in enumerate(active):
                i, j = self.taps[tap]
                index[g, slot] = tap * self.in_groups + ig
                packed[g, :, slot] = weight[g * po:(g + 1) * po, ig * pi:(ig + 1) * pi, i, j]
        self.slab_index = index
        self.packed_weight = packed.reshape(self.out_groups, po, width * pi)
        self.active_blocks = sum(len(active) for active in per_group)

    def accumulate(self, rows: Tensor) -> Tensor:
        if self.engine == "dense":
            return super().accumulate(rows)
        batch, _, _, width = rows.shape
        padded = F.pad(rows.to(torch.float64), (self.width_padding, self.width_padding))
        out_width = width + 2 * self.width_padding - self.weight.shape[3] + 1
        pi = self.hw.block_in
        # [B, C, kh, kw, w] windows -> one [PI, w] slab per (tap, input group), tap-major
        slabs = padded.unfold(3, out_width, 1).permute(0, 2, 3, 1, 4)
        slabs = slabs.reshape(batch, len(self.taps) * self.in_groups, pi, out_width)
        gathered = slabs.index_select(1, self.slab_index.reshape(-1))  # [B, out_groups * blocks, PI, w]
        gathered = gathered.reshape(batch, self.out_groups, -1, out_width)
        acc = torch.matmul(self.packed_weight, gathered)  # [B, out_groups, PO, w]
        return acc.reshape(batch, -1, 1, out_width).to(torch.int64)


class SaturationCounts:
    """How many elements of the row engine lie beyond each clamp, below and above it.

    Keys: ``ctx1``, ``ctx2``, ``channel_addition``, ``ep_mean`` (ep's even channels),
    ``pdf_index`` (ep's odd channels, clamped to [0, 127]), ``symbols`` (+-127) and
    ``latent_hat`` (the dequantized latent, kept in the activation range).
    """

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}

    def add(self, name: str, raw: Tensor, lo: Tensor | int, hi: Tensor | int) -> None:
        entry = self.counts.setdefault(name, {"below": 0, "above": 0})
        entry["below"] += int((raw < lo).sum())
        entry["above"] += int((raw > hi).sum())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {name: dict(entry) for name, entry in self.counts.items()}


def block_mask(mask: Tensor, block_in: int, block_out: int) -> Tensor:
    """Element mask [C_out, C_in, kh, kw] -> active blocks, bool [out_groups, in_groups, kh, kw]."""
    return mask[::block_out, ::block_in].to(torch.bool)


def _check_float64_exact(name: str, weight: Tensor, in_bound: int) -> None:
    worst = float(weight.abs().sum(dim=tuple(range(1, weight.dim()))).max()) * in_bound
    if worst >= FLOAT64_EXACT:
        raise fxp.FixedPointError(
            f"{name}: worst-case accumulator {worst:.3g} reaches 2**53; the integer model's float64 sums "
            "would not be exact")


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        return t.to(torch.float64).numpy().astype("<f8").tobytes()
    return t.to(torch.int64).numpy().astype("<i8").tobytes()


def model_hash(params: dict[str, dict[str, Tensor]], hw: HardwareConfig, model_cfg: ModelConfig, cdf_y: Tensor,
               cdf_z: Tensor, tanh_lut: Tensor) -> str:
    """SHA-256 (hex) of a canonical serialization of every integer, table and config of a model.

    Integers are hashed as little-endian int64 and scales as float64, with each tensor's name
    and shape, in sorted order, so the hash depends on the values alone and not on how they
    were stored (in memory, ``.npz`` or the HLS text streams).
    """
    digest = hashlib.sha256()
    header = {"format": HASH_FORMAT, "hardware": hw.to_dict(), "model": model_cfg.to_dict()}
    digest.update(json.dumps(header, sort_keys=True).encode())
    named = [(f"{layer}/{key}", params[layer][key]) for layer in sorted(params) for key in sorted(params[layer])]
    named += [("tables/cdf_y", cdf_y), ("tables/cdf_z", cdf_z), ("tables/tanh_lut", tanh_lut)]
    for name, tensor in named:
        digest.update(f"{name}:{'f8' if tensor.is_floating_point() else 'i8'}:{tuple(tensor.shape)};".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


class IntegerModel:
    """StreamLIC in exact integer arithmetic, built from exported parameters only.

    ``params`` maps each quantized layer (StreamLIC module name) to its integers, as
    :func:`streamlic.export.export_quantized_parameters` returns them. ``context_engine``
    chooses how the block-sparse row layers are evaluated: ``"sparse"`` computes only the
    active blocks, ``"dense"`` runs the full (masked) convolution; both give the same integers.
    """

    def __init__(self, params: dict[str, dict[str, Tensor]], *, hw: HardwareConfig, model_cfg: ModelConfig,
                 cdf_y: Tensor, cdf_z: Tensor, tanh_lut: Tensor, context_engine: str = "sparse"):
        if context_engine not in CONTEXT_ENGINES:
            raise ValueError(f"context_engine={context_engine!r}: expected one of {CONTEXT_ENGINES}")
        self.hw, self.model_cfg = hw, model_cfg
        self.M, self.N = model_cfg.M, model_cfg.N
        self.params = params
        self.cdf_y = cdf_y.to(torch.int32)
        self.cdf_z = cdf_z.to(torch.int32)
        self.tanh_lut = _as_int64(tanh_lut)
        self.context_engine = context_engine
        self.model_hash = model_hash(params, hw, model_cfg, self.cdf_y, self.cdf_z, self.tanh_lut)
        self._build_layers()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: "StreamLIC", context_engine: str = "sparse",
                   params: dict[str, dict[str, Tensor]] | None = None) -> "IntegerModel":
        """The integer model of a QAT-or-later StreamLIC (refuses an earlier stage).

        ``params``: the model's integers if :func:`~streamlic.export.export_quantized_parameters`
        already produced them.
        """
        from .entropy import coding_tables
        from .export import export_quantized_parameters  # lazy: export builds on this module

        require_integer_stage(model, "IntegerModel.from_model")
        if params is None:
            params = export_quantized_parameters(model)
        with torch.no_grad():
            cdf_y, cdf_z = coding_tables(model)
        return cls(params, hw=model.hw, model_cfg=model.model_cfg, cdf_y=cdf_y, cdf_z=cdf_z,
                   tanh_lut=fxp.tanh_table(model.hw), context_engine=context_engine)

    @classmethod
    def from_export(cls, directory: str | Path, context_engine: str = "sparse") -> "IntegerModel":
        """The integer model an export directory describes (npz, HLS streams, CDF tables, manifest)."""
        from .export import load_export

        parts = load_export(directory)
        model = cls(parts["params"], hw=parts["hw"], model_cfg=parts["model_cfg"], cdf_y=parts["cdf_y"],
                    cdf_z=parts["cdf_z"], tanh_lut=parts["tanh_lut"], context_engine=context_engine)
        if model.model_hash != parts["model_hash"]:
            raise ValueError(f"{directory}: the exported files give model hash {model.model_hash[:16]}…, the "
                             f"manifest says {parts['model_hash'][:16]}…; the files were modified or mixed "
                             "from different exports")
        return model

    def _layer_params(self, name: str, keys: tuple[str, ...]) -> dict[str, Tensor]:
        if name not in self.params:
            raise KeyError(f"integer parameters: layer {name} is missing")
        missing = [key for key in keys if key not in self.params[name]]
        if missing:
            raise KeyError(f"integer parameters: layer {name} lacks {missing}")
        return self.params[name]

    def _build_layers(self) -> None:
        hw = self.hw
        act = hw.act_max
        in_bounds = {"g_a.0": hw.image_max, "h_s.0": fxp.SYMBOL_MAX}
        self.layers: dict[str, Callable[[Tensor], Tensor]] = {}
        for name, kind, stride, padding in ANALYSIS + HYPER_ANALYSIS + HYPER_SYNTHESIS + SYNTHESIS:
            if kind == "leaky":
                self.layers[name] = fxp.leaky_relu
            elif kind == "lagc":
                self.layers[name] = _LAGC(name, self._layer_params(name, LAGC_KEYS), hw, self.tanh_lut)
            elif kind == "upsample":
                self.layers[name] = _UpsampleConv(name, self._layer_params(name, CONV_KEYS), hw,
                                                  in_bounds.get(name, act))
            else:
                bound = fxp.latent_bound(hw) if kind == "latent" else None
                self.layers[name] = _Conv(name, self._layer_params(name, CONV_KEYS), hw, in_bounds.get(name, act),
                                          stride, padding, None if bound is None else -bound, bound)
        self.output_scale = float(self._layer_params(SYNTHESIS[-1][0], FLOAT_KEYS)["float_output_scale"])
        # ep's odd channels output the scale index directly, clamped to [0, 127]
        odd = torch.zeros(2 * self.M, 1, 1, dtype=torch.bool)
        odd[1::2] = True
        ep_lo = torch.where(odd, 0, -act).to(torch.int64)
        ep_hi = torch.where(odd, fxp.SCALE_LEVELS - 1, act).to(torch.int64)
        self.context: dict[str, _BlockSparseRowConv] = {}
        for short, name in CONTEXT_LAYERS.items():
            lo, hi = (ep_lo, ep_hi) if short == "ep" else (None, None)
            self.context[short] = _BlockSparseRowConv(
                name, self._layer_params(name, CONV_KEYS + ("mask",)), hw, act, CONTEXT_WIDTH_PADDING[short],
                self.context_engine, lo, hi)

    def with_context_engine(self, context_engine: str) -> "IntegerModel":
        """The same model with the other evaluation of the block-sparse layers."""
        return IntegerModel(self.params, hw=self.hw, model_cfg=self.model_cfg, cdf_y=self.cdf_y, cdf_z=self.cdf_z,
                            tanh_lut=self.tanh_lut, context_engine=context_engine)

    # ------------------------------------------------------------------ network pieces
    def _chain(self, spec, q: Tensor, record: dict[str, Tensor] | None) -> Tensor:
        for name, *_ in spec:
            q = self.layers[name](q)
            if record is not None:
                record[name] = q
        return q

    def quantize_input(self, x: Tensor) -> Tensor:
        """Integer image ``round(2 image_max x) - image_max`` of ``x`` in [0, 1] (float64 first)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch [B, 3, H, W], got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % PAD_MULTIPLE or width % PAD_MULTIPLE:
            raise ValueError(f"image size {height}x{width}: height and width must be multiples of {PAD_MULTIPLE} "
                             "(pad with streamlic.integer_model.pad_to_multiple)")
        return _as_int64(fxp.quantize_image(x.detach().cpu().to(torch.float64), self.hw))

    def _analysis(self, x: Tensor, record: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        q = self.quantize_input(x)
        if record is not None:
            record["x"] = q
        y_q = self._chain(ANALYSIS, q, record)
        z_q = self._chain(HYPER_ANALYSIS, F.pad(y_q, HYPER_ANALYSIS_PAD), record)
        z_hat = fxp.hyper_symbols(z_q, self.hw)
        if record is not None:
            record["z_hat"] = z_hat
        return y_q, z_hat

    def analysis(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Latent ``y_q`` [B, M, H/16, W/16] (scale 2**-(A-8)) and hyper symbols ``z_hat`` [B, N, H/64, W/64]."""
        return self._analysis(x)

    def hyper_synthesis(self, z_hat: Tensor, record: dict[str, Tensor] | None = None) -> Tensor:
        """Hyper output (entropy-parameter input) ``params_q`` [B, 2M, 4h, 4w] from the hyper symbols."""
        return self._chain(HYPER_SYNTHESIS, _as_int64(z_hat), record)

    def synthesis(self, y_hat_q: Tensor, record: dict[str, Tensor] | None = None) -> Tensor:
        """Reconstruction [B, 3, 16h, 16w] in [0, 1] (float32) from the dequantized latents."""
        q = self._chain(SYNTHESIS, _as_int64(y_hat_q), record)
        return torch.clamp(q.to(torch.float64) * self.output_scale + 0.5, 0.0, 1.0).to(torch.float32)

    # ------------------------------------------------------------------ autoregressive engine
    def _context_layer(self, short: str, x: Tensor, saturation: SaturationCounts | None) -> Tensor:
        layer = self.context[short]
        acc = layer.accumulate(x)
        if saturation is not None:
            raw = layer.requantize(acc, clamped=False)
            act = self.hw.act_max
            if short == "ep":
                saturation.add("ep_mean", raw[:, 0::2], -act, act)
                saturation.add("pdf_index", raw[:, 1::2], 0, fxp.SCALE_LEVELS - 1)
            else:
                saturation.add(short, raw, -act, act)
        return layer.requantize(acc)

    def _predict_row(self, prev_rows: Tensor, params_row: Tensor,
                     saturation: SaturationCounts | None = None) -> dict[str, Tensor]:
        ctx1 = self._context_layer("ctx1", prev_rows, saturation)
        ctx1_act = fxp.leaky_relu(ctx1)
        ctx2 = self._context_layer("ctx2", ctx1_act, saturation)
        if saturation is not None:
            saturation.add("channel_addition", params_row + ctx2, -self.hw.act_max, self.hw.act_max)
        summed = fxp.channel_add(params_row, ctx2, self.hw)
        summed_act = fxp.leaky_relu(summed)
        ep = self._context_layer("ep", summed_act, saturation)
        return {"context_prediction.1": ctx1, "context_prediction.2": ctx1_act, "context_prediction.3": ctx2,
                "entropy_parameters.0": summed, "entropy_parameters.1": summed_act, "entropy_parameters.2": ep}

    def predict_row(self, prev_rows: Tensor, params_row: Tensor) -> tuple[Tensor, Tensor]:
        """Means ``mu_q`` [B, M, 1, w] and scale indices [B, M, 1, w] of one latent row.

        ``prev_rows`` [B, M, 3, w + 2]: the dequantized latents of the three rows above,
        padded by one column left and right (zeros above the first row).
        ``params_row`` [B, 2M, 1, w]: the hyper output of this row.
        """
        ep = self._predict_row(_as_int64(prev_rows), _as_int64(params_row))["entropy_parameters.2"]
        return ep[:, 0::2], ep[:, 1::2]

    def _rows(self, params_q: Tensor, next_symbols: Callable[[int, Tensor, Tensor], Tensor],
              record: dict[str, list[Tensor]] | None = None,
              saturation: SaturationCounts | None = None) -> dict[str, Tensor]:
        params_q = _as_int64(params_q)
        batch, channels, height, width = params_q.shape
        if channels != 2 * self.M:
            raise ValueError(f"hyper output has {channels} channels, expected 2M = {2 * self.M}")
        padded = params_q.new_zeros(batch, self.M, height + 3, width + 2)
        symbols = params_q.new_empty(batch, self.M, height, width)
        pdf_index = torch.empty_like(symbols)
        for h in range(height):
            layers = self._predict_row(padded[:, :, h:h + 3], params_q[:, :, h:h + 1], saturation)
            ep = layers["entropy_parameters.2"]
            mu_q, index = ep[:, 0::2], ep[:, 1::2]
            row_symbols = next_symbols(h, mu_q, index)
            symbols[:, :, h:h + 1] = row_symbols
            pdf_index[:, :, h:h + 1] = index
            padded[:, :, h + 3:h + 4, 1:-1] = fxp.dequantize_latent(row_symbols, mu_q, self.hw)
            if saturation is not None:
                saturation.add("latent_hat", fxp.dequantized_latent_unclamped(row_symbols, mu_q, self.hw),
                               -self.hw.act_max, self.hw.act_max)
            if record is not None:
                for name, tensor in layers.items():
                    record.setdefault(name, []).append(tensor)
        return {"symbols": symbols, "pdf_index": pdf_index, "y_hat_q": padded[:, :, 3:, 1:-1]}

    def encode_rows(self, y_q: Tensor, params_q: Tensor, record: dict[str, list[Tensor]] | None = None,
                    saturation: SaturationCounts | None = None) -> dict[str, Tensor]:
        """Encoder row loop: symbols, scale indices and dequantized latents ``y_hat_q`` [B, M, h, w].

        ``saturation``, if given, counts the elements beyond every clamp of the row engine.
        """
        y_q = _as_int64(y_q)
        if y_q.shape[0] != params_q.shape[0] or y_q.shape[1] != self.M or y_q.shape[2:] != params_q.shape[2:]:
            raise ValueError(f"latent {tuple(y_q.shape)} does not match hyper output {tuple(params_q.shape)}")

        def quantize(h: int, mu_q: Tensor, index: Tensor) -> Tensor:
            if saturation is not None:
                saturation.add("symbols", fxp.symbol_residual(y_q[:, :, h:h + 1], mu_q, self.hw),
                               -fxp.SYMBOL_MAX, fxp.SYMBOL_MAX)
            return fxp.latent_symbols(y_q[:, :, h:h + 1], mu_q, self.hw)

        return self._rows(params_q, quantize, record, saturation)

    def decode_rows(self, params_q: Tensor, read_row: Callable[[int, Tensor], Tensor]) -> dict[str, Tensor]:
        """Decoder row loop; ``read_row(h, pdf_index_row)`` returns row ``h``'s symbols [B, M, 1, w]."""

        def read(h: int, mu_q: Tensor, index: Tensor) -> Tensor:
            row = read_row(h, index)
            if tuple(row.shape) != tuple(index.shape):
                raise ValueError(f"read_row({h}) returned shape {tuple(row.shape)}, expected {tuple(index.shape)}")
            row = _as_int64(row)
            if bool((row.abs() > fxp.SYMBOL_MAX).any()):
                raise ValueError(f"read_row({h}) returned symbols outside ±{fxp.SYMBOL_MAX}")
            return row

        return self._rows(params_q, read)

    # ------------------------------------------------------------------ whole network
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Every layer's integer tensor by name (StreamLIC module names), plus the coded quantities.

        Keys: ``x`` (integer image), the g_a/h_a/h_s/g_s layers, ``z_hat``, the row engine's
        layers assembled over all rows, ``symbols``, ``pdf_index``, ``y_hat`` and ``x_hat``.
        """
        record: dict[str, Tensor] = {}
        y_q, z_hat = self._analysis(x, record)
        params_q = self.hyper_synthesis(z_hat, record)
        rows: dict[str, list[Tensor]] = {}
        coded = self.encode_rows(y_q, params_q, rows)
        record.update({name: torch.cat(chunks, dim=2) for name, chunks in rows.items()})
        record.update(symbols=coded["symbols"], pdf_index=coded["pdf_index"], y_hat=coded["y_hat_q"])
        record["x_hat"] = self.synthesis(coded["y_hat_q"], record)
        return record

    __call__ = forward


# ---------------------------------------------------------------------- bit-exactness harness

# StreamLIC outputs compared with the integer model's coded quantities
_CODED = {"z_hat": "z_symbols", "symbols": "y_symbols", "pdf_index": "pdf_index"}


def _integer_step(module) -> Tensor | float:
    """Real value of one integer step of a module's output."""
    if isinstance(module, QConv2d):
        return module.output_scale_map()
    if isinstance(module, LAGC):
        return module.out_scale
    if isinstance(module, QLeakyReLU):
        return module.in_scale
    if isinstance(module, ChannelAddition):
        return module.scale
    raise TypeError(f"no integer output scale for {type(module).__name__}")


@dataclass
class LayerDiff:
    """Comparison of one layer's integers: QAT (float64) against the integer model."""

    name: str
    shape: tuple[int, ...]
    mismatches: int
    max_abs_diff: int
    max_off_grid: float = 0.0  # largest distance of a QAT value from the integer grid (should be ~0)


@dataclass
class BitExactReport:
    """Per-layer mismatch counts, in network order."""

    layers: list[LayerDiff] = field(default_factory=list)

    @property
    def first_mismatch(self) -> LayerDiff | None:
        return next((layer for layer in self.layers if layer.mismatches), None)

    @property
    def exact(self) -> bool:
        return self.first_mismatch is None

    @property
    def total_mismatches(self) -> int:
        return sum(layer.mismatches for layer in self.layers)

    def __getitem__(self, name: str) -> LayerDiff:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def format(self) -> str:
        lines = [f"{'layer':<24}{'shape':<22}{'mismatches':>11}{'max |diff|':>11}{'off grid':>10}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<24}{str(list(layer.shape)):<22}{layer.mismatches:>11}"
                         f"{layer.max_abs_diff:>11}{layer.max_off_grid:>10.2g}")
        first = self.first_mismatch
        lines.append("bit-exact" if first is None else f"first differing layer: {first.name} "
                     f"({first.mismatches} integers, max |diff| {first.max_abs_diff})")
        return "\n".join(lines)

    __str__ = format


def _diff(name: str, qat: Tensor, ref: Tensor, off_grid: float = 0.0) -> LayerDiff:
    if qat.shape != ref.shape:
        raise ValueError(f"{name}: QAT shape {tuple(qat.shape)} differs from the integer model's {tuple(ref.shape)}")
    diff = (qat.to(torch.int64) - ref).abs()
    return LayerDiff(name, tuple(ref.shape), int((diff > 0).sum()), int(diff.max()) if diff.numel() else 0, off_grid)


def qat_integers(model: "StreamLIC", x: Tensor, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Every layer's integers as the QAT model computes them (eval, in ``dtype``), by module name.

    Forward hooks read each layer's real output and divide it by its integer step; the
    row engine's layers, called once per latent row, are assembled over all rows. The coded
    quantities (``z_hat``, ``symbols``, ``pdf_index``) come from the model's outputs.
    Each value of the returned dict is ``(integers, max distance from the integer grid)``.
    """
    require_integer_stage(model, "qat_integers")
    qat = copy.deepcopy(model).cpu().to(dtype).eval()
    captured: dict[str, list[Tensor]] = {}
    hooks = []
    for chain in ("g_a", "h_a", "h_s", "g_s", "context_prediction", "entropy_parameters"):
        for index, module in enumerate(getattr(qat, chain)):
            if isinstance(module, (torch.nn.ZeroPad2d, torch.nn.Identity)):
                continue
            name = f"{chain}.{index}"

            def hook(mod, inputs, output, name=name):
                captured.setdefault(name, []).append(output.detach() / _integer_step(mod))

            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = qat(x.cpu().to(dtype))
    finally:
        for handle in hooks:
            handle.remove()
    result = {}
    for name, chunks in captured.items():
        real = torch.cat(chunks, dim=2)
        rounded = torch.round(real)
        result[name] = (rounded, float((real - rounded).abs().max()))
    for ours, theirs in _CODED.items():
        result[ours] = (out[theirs].detach(), 0.0)
    return result


def compare_with_qat(model: "StreamLIC", x: Tensor, integer_model: IntegerModel | None = None,
                     dtype: torch.dtype = torch.float64) -> BitExactReport:
    """Run the QAT model (float64, eval) and the integer model on ``x`` and compare every layer.

    ``x`` [B, 3, H, W] in [0, 1] of any size is padded to a multiple of 64 first. The
    integer model defaults to ``IntegerModel.from_model(model)``. ``dtype=torch.float32``
    measures the training-precision forward instead.
    """
    x = pad_to_multiple(x)
    integer_model = integer_model or IntegerModel.from_model(model)
    reference = integer_model.forward(x)
    qat = qat_integers(model, x, dtype)
    report = BitExactReport()
    for name, ref in reference.items():
        if name in qat:
            integers, off_grid = qat[name]
            report.layers.append(_diff(name, integers, ref, off_grid))
    first = report.first_mismatch
    if first is not None:
        log.info("QAT and integer model differ first at %s (%d integers)", first.name, first.mismatches)
    return report
