"""The integer reference model: StreamLIC from exported integers alone (docs/fixed-point.md).

No float weight enters :class:`IntegerModel`; every tensor it computes is int64 and every
rule comes from :mod:`streamlic.fixedpoint` (through :mod:`streamlic.integer_layers`). It is
the golden model of the hardware and the codec's decoder: ``analysis`` → ``encode_rows`` on
the encoder side, ``hyper_synthesis`` → ``decode_rows`` → ``synthesis`` on the decoder
side. The autoregressive engine predicts a whole latent row at once from the three rows
above it, and its block-sparse layers compute only their active (input group, tap) blocks,
so its cost follows the sparse MAC count.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from . import fixedpoint as fxp
from . import topology
from .config import HardwareConfig, ModelConfig
from . import kinds
from .integer_layers import BlockSparseRowConv, as_int64
from .params import export_quantized_parameters, require_integer_stage

if TYPE_CHECKING:
    from .model import StreamLIC

log = logging.getLogger(__name__)

HASH_FORMAT = 1
CONTEXT_ENGINES = ("sparse", "dense")


class SaturationCounts:
    """How many elements of the row engine lie beyond each clamp, below and above it.

    Keys: ``ctx1``, ``ctx2``, ``channel_addition``, ``ep_mean`` (ep's even channels),
    ``pdf_index`` (ep's odd channels, clamped to [0, SCALE_INDEX_MAX]), ``symbols`` (+-SYMBOL_MAX) and
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
    :func:`streamlic.params.export_quantized_parameters` returns them. ``context_engine``
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
        self.tanh_lut = as_int64(tanh_lut)
        self.context_engine = context_engine
        self.model_hash = model_hash(params, hw, model_cfg, self.cdf_y, self.cdf_z, self.tanh_lut)
        self._build_layers()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: "StreamLIC", context_engine: str = "sparse",
                   params: dict[str, dict[str, Tensor]] | None = None) -> "IntegerModel":
        """The integer model of a QAT-or-later StreamLIC (refuses an earlier stage).

        ``params``: the model's integers if :func:`~streamlic.params.export_quantized_parameters`
        already produced them.
        """
        from .entropy import coding_tables  # lazy: the entropy models import compressai

        require_integer_stage(model, "IntegerModel.from_model")
        if params is None:
            params = export_quantized_parameters(model)
        with torch.no_grad():
            cdf_y, cdf_z = coding_tables(model)
        return cls(params, hw=model.hw, model_cfg=model.model_cfg, cdf_y=cdf_y, cdf_z=cdf_z,
                   tanh_lut=fxp.tanh_table(model.hw), context_engine=context_engine)

    def _layer_params(self, name: str, keys: tuple[str, ...]) -> dict[str, Tensor]:
        if name not in self.params:
            raise KeyError(f"integer parameters: layer {name} is missing")
        missing = [key for key in keys if key not in self.params[name]]
        if missing:
            raise KeyError(f"integer parameters: layer {name} lacks {missing}")
        return self.params[name]

    def _build_layers(self) -> None:
        """One integer layer per row of the network table (streamlic.kinds); the row engine's layers by their
        short names."""
        net = topology.network(self.model_cfg)
        tanh_luts = {self.hw.activation_bits: self.tanh_lut}  # one table per activation width (LAGC's tanh)

        def build(spec: topology.LayerSpec):
            kind = kinds.kind_of(spec)
            params = self._layer_params(spec.path, tuple(kind.fields)) if kind.fields else {}
            hw = self.hw.for_layer(spec.path)  # each layer at its own widths, reading its producer's
            if hw.activation_bits not in tanh_luts:
                tanh_luts[hw.activation_bits] = as_int64(fxp.tanh_table(hw))
            context = kinds.IntegerContext(hw, tanh_luts[hw.activation_bits], topology.input_bound(spec, self.hw),
                                           self.context_engine)
            return kinds.build_integer(spec, params, context)

        self.chains: dict[str, list[tuple[topology.LayerSpec, Callable[[Tensor], Tensor]]]] = {
            name: [(spec, build(spec)) for spec in net[name]] for name in ("g_a", "h_a", "h_s", "g_s")}
        self.output_scale = float(self._layer_params(net["g_s"][-1].path, kinds.FLOAT_FIELDS)["float_output_scale"])
        self.context: dict[str, BlockSparseRowConv] = {
            short: build(topology.layer_with(self.model_cfg, sparse=short)) for short in topology.SPARSE_LAYERS}
        self.row_paths = topology.row_engine_paths(self.model_cfg)

    def with_context_engine(self, context_engine: str) -> "IntegerModel":
        """The same model with the other evaluation of the block-sparse layers."""
        return IntegerModel(self.params, hw=self.hw, model_cfg=self.model_cfg, cdf_y=self.cdf_y, cdf_z=self.cdf_z,
                            tanh_lut=self.tanh_lut, context_engine=context_engine)

    # ------------------------------------------------------------------ network pieces
    def _chain(self, name: str, q: Tensor, record: dict[str, Tensor] | None) -> Tensor:
        for spec, layer in self.chains[name]:
            q = layer(q)
            if record is not None and spec.kind != topology.PAD:
                record[spec.path] = q
        return q

    def quantize_input(self, x: Tensor) -> Tensor:
        """Integer image ``round(2 image_max x) - image_max`` of ``x`` in [0, 1] (float64 first)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch [B, 3, H, W], got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % topology.PAD_MULTIPLE or width % topology.PAD_MULTIPLE:
            raise ValueError(f"image size {height}x{width}: height and width must be multiples of "
                             f"{topology.PAD_MULTIPLE} (pad with streamlic.topology.pad_to_multiple)")
        hw = self.hw.for_layer(topology.IMAGE_READER)
        return as_int64(fxp.quantize_image(x.detach().cpu().to(torch.float64), hw))

    def _analysis(self, x: Tensor, record: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        q = self.quantize_input(x)
        if record is not None:
            record["x"] = q
        y_q = self._chain("g_a", q, record)
        z_q = self._chain("h_a", y_q, record)
        z_hat = fxp.hyper_symbols(z_q, self.hw.latent_hw)
        if record is not None:
            record["z_hat"] = z_hat
        return y_q, z_hat

    def analysis(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Latent ``y_q`` [B, M, H/16, W/16] (scale 2**-(A-8)) and hyper symbols ``z_hat`` [B, N, H/64, W/64]."""
        return self._analysis(x)

    def hyper_synthesis(self, z_hat: Tensor, record: dict[str, Tensor] | None = None) -> Tensor:
        """Hyper output (entropy-parameter input) ``params_q`` [B, 2M, 4h, 4w] from the hyper symbols."""
        return self._chain("h_s", as_int64(z_hat), record)

    def synthesis(self, y_hat_q: Tensor, record: dict[str, Tensor] | None = None) -> Tensor:
        """Reconstruction [B, 3, 16h, 16w] in [0, 1] (float32) from the dequantized latents."""
        q = self._chain("g_s", as_int64(y_hat_q), record)
        return torch.clamp(q.to(torch.float64) * self.output_scale + 0.5, 0.0, 1.0).to(torch.float32)

    # ------------------------------------------------------------------ autoregressive engine
    def _context_layer(self, short: str, x: Tensor, saturation: SaturationCounts | None) -> Tensor:
        layer = self.context[short]
        acc = layer.accumulate(x)
        if saturation is not None:
            raw = layer.requantize(acc, clamped=False)
            act = layer.hw.act_max
            if short == topology.EP:
                saturation.add("ep_mean", raw[:, 0::2], -act, act)
                saturation.add("pdf_index", raw[:, 1::2], 0, fxp.SCALE_INDEX_MAX)
            else:
                saturation.add(short, raw, -act, act)
        return layer.requantize(acc)

    def _predict_row(self, prev_rows: Tensor, params_row: Tensor,
                     saturation: SaturationCounts | None = None) -> dict[str, Tensor]:
        ctx1 = self._context_layer(topology.CTX1, prev_rows, saturation)
        ctx1_act = fxp.leaky_relu(ctx1)
        ctx2 = self._context_layer(topology.CTX2, ctx1_act, saturation)
        summed_hw = self.hw.for_layer(self.row_paths["summed"])  # the entropy path's width
        if saturation is not None:
            saturation.add("channel_addition", params_row + ctx2, -summed_hw.act_max, summed_hw.act_max)
        summed = fxp.channel_add(params_row, ctx2, summed_hw)
        summed_act = fxp.leaky_relu(summed)
        ep = self._context_layer(topology.EP, summed_act, saturation)
        tensors = {topology.CTX1: ctx1, "ctx1_act": ctx1_act, topology.CTX2: ctx2, "summed": summed,
                   "summed_act": summed_act, topology.EP: ep}
        return {self.row_paths[name]: tensor for name, tensor in tensors.items()}

    def predict_row(self, prev_rows: Tensor, params_row: Tensor) -> tuple[Tensor, Tensor]:
        """Means ``mu_q`` [B, M, 1, w] and scale indices [B, M, 1, w] of one latent row.

        ``prev_rows`` [B, M, 3, w + 2]: the dequantized latents of the three rows above,
        padded by one column left and right (zeros above the first row).
        ``params_row`` [B, 2M, 1, w]: the hyper output of this row.
        """
        ep = self._predict_row(as_int64(prev_rows), as_int64(params_row))[self.row_paths[topology.EP]]
        return ep[:, 0::2], ep[:, 1::2]

    def _rows(self, params_q: Tensor, next_symbols: Callable[[int, Tensor, Tensor], Tensor],
              record: dict[str, list[Tensor]] | None = None,
              saturation: SaturationCounts | None = None) -> dict[str, Tensor]:
        params_q = as_int64(params_q)
        batch, channels, height, width = params_q.shape
        if channels != 2 * self.M:
            raise ValueError(f"hyper output has {channels} channels, expected 2M = {2 * self.M}")
        padded = topology.context_buffer(params_q[:, :self.M], height, width)
        symbols = params_q.new_empty(batch, self.M, height, width)
        pdf_index = torch.empty_like(symbols)
        latent = self.hw.latent_hw
        for h in range(height):
            layers = self._predict_row(topology.context_window(padded, h), params_q[:, :, h:h + 1], saturation)
            ep = layers[self.row_paths[topology.EP]]
            mu_q, index = ep[:, 0::2], ep[:, 1::2]
            row_symbols = next_symbols(h, mu_q, index)
            symbols[:, :, h:h + 1] = row_symbols
            pdf_index[:, :, h:h + 1] = index
            topology.context_interior(padded, h).copy_(fxp.dequantize_latent(row_symbols, mu_q, latent))
            if saturation is not None:
                saturation.add("latent_hat", fxp.dequantized_latent_unclamped(row_symbols, mu_q, latent),
                               -latent.act_max, latent.act_max)
            if record is not None:
                for name, tensor in layers.items():
                    record.setdefault(name, []).append(tensor)
        return {"symbols": symbols, "pdf_index": pdf_index, "y_hat_q": topology.context_interior(padded)}

    def encode_rows(self, y_q: Tensor, params_q: Tensor, record: dict[str, list[Tensor]] | None = None,
                    saturation: SaturationCounts | None = None) -> dict[str, Tensor]:
        """Encoder row loop: symbols, scale indices and dequantized latents ``y_hat_q`` [B, M, h, w].

        ``saturation``, if given, counts the elements beyond every clamp of the row engine.
        """
        y_q = as_int64(y_q)
        if y_q.shape[0] != params_q.shape[0] or y_q.shape[1] != self.M or y_q.shape[2:] != params_q.shape[2:]:
            raise ValueError(f"latent {tuple(y_q.shape)} does not match hyper output {tuple(params_q.shape)}")

        def quantize(h: int, mu_q: Tensor, index: Tensor) -> Tensor:
            if saturation is not None:
                saturation.add("symbols", fxp.symbol_residual(y_q[:, :, h:h + 1], mu_q, self.hw.latent_hw),
                               -fxp.SYMBOL_MAX, fxp.SYMBOL_MAX)
            return fxp.latent_symbols(y_q[:, :, h:h + 1], mu_q, self.hw.latent_hw)

        return self._rows(params_q, quantize, record, saturation)

    def decode_rows(self, params_q: Tensor, read_row: Callable[[int, Tensor], Tensor]) -> dict[str, Tensor]:
        """Decoder row loop; ``read_row(h, pdf_index_row)`` returns row ``h``'s symbols [B, M, 1, w]."""

        def read(h: int, mu_q: Tensor, index: Tensor) -> Tensor:
            row = read_row(h, index)
            if tuple(row.shape) != tuple(index.shape):
                raise ValueError(f"read_row({h}) returned shape {tuple(row.shape)}, expected {tuple(index.shape)}")
            row = as_int64(row)
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
