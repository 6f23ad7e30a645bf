"""The StreamLIC network (docs/architecture.md) and its five-stage API (docs/stages.md)."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.models import CompressionModel
from torch import Tensor, nn

from . import fixedpoint as fxp
from . import topology
from .config import (PER_LAYER_DEFAULTS, HardwareConfig, ModelConfig, checkpoint_fixed, hardware_config, model_config,
                     sparsity_config)
from .entropy import RectifiedPDF, bottleneck_pmf_table, gaussian_pmf_table
from .kinds import build_qat
from .layers import (ChannelAddition, FGPConv2d, IntegerParameters, QLeakyReLU, QuantLayer, RangeTracker,
                     straight_through)
from .params import export_quantized_parameters
from .stage import STATE_VERSION, StageState, stage_state_of_version_1

log = logging.getLogger(__name__)

# Version 1 named the upsample convolutions' parameters ``<path>.conv.<name>``, had no padding
# slot in front of the context model and kept the stage in seven flags; version 2 uses the
# research code's module paths and the stage state of streamlic.stage.
_V1_CONTEXT_SHIFT = 1


class StreamLIC(StageState, CompressionModel):
    """Hyperprior + row-causal context model with a fixed-point, block-sparse datapath.

    Sizes come from ``model`` (:class:`ModelConfig` or a mapping), bit-widths from
    ``hardware``, densities of the context layers from ``sparsity``. ``N`` and ``M`` are
    accepted as keyword shortcuts, as in the original research code. compressai's
    ``compress``/``decompress`` are attached by :mod:`streamlic.codec` (which builds on this
    module and runs them); ``from streamlic import StreamLIC`` loads it.
    """

    def __init__(self, N: int | None = None, M: int | None = None, *, model: Any = None, hardware: Any = None,
                 sparsity: Any = None):
        mcfg = model_config(model)
        if N is not None or M is not None:
            mcfg = ModelConfig(**{**mcfg.to_dict(), **({"N": N} if N is not None else {}),
                                  **({"M": M} if M is not None else {})})
        hw = hardware_config(hardware)
        sp = sparsity_config(sparsity)
        mcfg.validate_against(hw)  # every constraint is checked before a tensor is built
        super().__init__()
        self.model_cfg, self.hw, self.sparsity_cfg = mcfg, hw, sp
        for name, specs in topology.network(mcfg).items():
            setattr(self, name, nn.Sequential(*(build_qat(spec, hw, sp) for spec in specs)))
        self._report_density_rounding()
        self.entropy_bottleneck = EntropyBottleneck(mcfg.N)
        self.gaussian_conditional = GaussianConditional(None, scale_bound=2.0**fxp.LOG2_SIGMA_MIN)
        self.rectified_cdf_y = RectifiedPDF(fxp.SCALE_LEVELS)
        self.rectified_cdf_z = RectifiedPDF(mcfg.N)
        self.register_buffer("clamped_symbols", torch.zeros((), dtype=torch.long), persistent=False)
        # activation ranges of all layers are updated together at the end of each training forward
        self.range_tracker = RangeTracker()
        # the integer parameters of all trainable layers are formed together at the start of each QAT step
        self.integer_parameters = IntegerParameters()
        self._quant_layers = [module for module in self.modules() if isinstance(module, QuantLayer)]
        self._row_step = None  # decode_row's replacement inside rows_through (a compiled evaluation)
        for name, module in self.named_modules():
            if isinstance(module, QuantLayer):
                module.layer_name = name
                module.range_tracker = self.range_tracker
                module.integer_parameters = self.integer_parameters

        self._init_stage_state()
        self._apply_stage()
        self.register_load_state_dict_pre_hook(_upgrade_state_dict)

    # ------------------------------------------------------------------ structure
    @property
    def N(self) -> int:
        return self.model_cfg.N

    @property
    def M(self) -> int:
        return self.model_cfg.M

    def sparse_layers(self) -> dict[str, FGPConv2d]:
        return {short: self.get_submodule(path) for short, path in topology.sparse_paths(self.model_cfg).items()}

    def _report_density_rounding(self) -> None:
        """Warn (once, at construction) where the block grid turns a requested density into another one."""
        for name, layer in self.sparse_layers().items():
            requested = self.sparsity_cfg.requested_density(name)
            achieved = topology.density(layer.blocks_per_group, layer.blocks_total)
            if requested is not None and abs(achieved - requested) > 1e-9:
                key = f"sparsity.layers.{name}" if name in self.sparsity_cfg.layers else "sparsity.density"
                log.warning("%s=%g: %s keeps %d of %d input groups per tap and output group, density %.4g "
                            "(the nearest the %d-channel blocks allow)", key, requested, name, layer.group_num,
                            layer.in_groups, achieved, layer.block_in)

    def input_scales(self) -> dict[str, float]:
        """Scale of the integers entering each sub-network (docs/fixed-point.md)."""
        ls = self.hw.latent_scale
        image = fxp.image_scale(self.hw.for_layer(topology.IMAGE_READER))
        return {"g_a": image, "h_a": ls, "h_s": 1.0, "g_s": ls,
                "context_prediction": ls, "entropy_parameters": ls}

    def _quant_modules(self):
        return [m for m in self.modules() if isinstance(m, (QuantLayer, QLeakyReLU, ChannelAddition))]

    # ------------------------------------------------------------------ stage preparations (streamlic.stage)
    def _freeze_scales(self) -> None:
        """Capture every layer's weight scales and multipliers, sub-network by sub-network."""
        learned = [m for m in self._quant_layers if m.fixed_scale is None]
        measured = any(float(m.act_absmax) > 0 for m in learned)
        if not measured:
            log.warning("toggle_quantization: no activation range was ever measured (the model never ran in "
                        "training mode on images); the scales are floors and the quantized model will not "
                        "reconstruct images: train stage 1 first")
        for name, chain in self._chains().items():
            scale = torch.tensor(self.input_scales()[name])
            for module in chain:
                if hasattr(module, "freeze"):
                    scale = module.freeze(scale)
        raised = [m for m in learned if m.raised_range is not None]
        if raised and measured:  # unmeasured ranges are all raised; the warning above says why
            log.warning("%d activation range(s) raised so that their multipliers fit %d bits: %s", len(raised),
                        self.hw.multiplier_bits, ", ".join(f"{m.layer_name} {m.raised_range[0]:.3g}->"
                                                       f"{m.raised_range[1]:.3g}" for m in raised))
        log.info("quantization scales captured")

    def _cut_masks(self) -> None:
        for name, layer in self.sparse_layers().items():
            layer.set_mask()
            kept, total = layer.blocks_per_group, layer.blocks_total
            log.info("%s: block mask cut, %d of %d blocks per output group kept (density %.4g)", name, kept, total,
                     topology.density(kept, total))

    def _init_tables(self) -> None:
        sigmas = fxp.sigma_levels(torch.float32).to(self.rectified_cdf_y.logits.device)
        self.rectified_cdf_y.init_from_pmf(gaussian_pmf_table(self.gaussian_conditional, sigmas))
        self.rectified_cdf_z.init_from_pmf(bottleneck_pmf_table(self.entropy_bottleneck))

    def _apply_stage(self) -> None:
        """Set every layer's numerics and every parameter's trainability from the stage state."""
        for module in self._quant_modules():
            module.quantized = self.quantized
            if isinstance(module, QuantLayer):
                module.scales_frozen = module.scales_frozen or self.scales_frozen
        for layer in self.sparse_layers().values():
            layer.masked = self.masked
            layer.mask_set = self.masks_set
        for module in (self.g_a, self.h_a):
            module.requires_grad_(not self.encoder_fixed)
        for module in (self.g_s, self.h_s, self.context_prediction, self.entropy_parameters,
                       self.entropy_bottleneck, self.gaussian_conditional):
            module.requires_grad_(not self.pdf_training)
        self.rectified_cdf_y.requires_grad_(self.pdf_training)
        self.rectified_cdf_z.requires_grad_(self.pdf_training)

    @torch.no_grad()
    def calibrate(self, images: Tensor, passes: int = 1) -> None:
        """Measure activation ranges and sparse-layer input statistics on ``images`` [B, 3, H, W].

        Training-mode forward passes without a weight update: what stage 1 gathers, for a model
        that goes to QAT without training (benchmarks, examples). Images of any size are padded
        to a multiple of 64.
        """
        was_training = self.training
        self.train()
        for _ in range(passes):
            self(topology.pad_to_multiple(images))
        self.train(was_training)

    def regularization_loss(self, weight: float | None = None) -> Tensor:
        """Group-lasso term on the blocks outside each sparse layer's kept set."""
        weight = self.sparsity_cfg.group_lasso if weight is None else weight
        total = sum(layer.group_lasso() for layer in self.sparse_layers().values())
        return total * weight

    def export_quantized_parameters(self) -> dict[str, dict[str, Tensor]]:
        """Every quantized layer's integers (weight, bias, scale_param, scale_shift, mask, scales) by name.

        Stage 3 (QAT) or later; see :func:`streamlic.params.export_quantized_parameters`.
        """
        return export_quantized_parameters(self)

    def update(self, scale_table: Tensor | None = None, force: bool = False, update_quantiles: bool = False) -> bool:
        if scale_table is None:
            scale_table = fxp.sigma_levels(torch.float32)
        return super().update(scale_table=scale_table, force=force, update_quantiles=update_quantiles)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **self.stage_state(),
            "config": {"model": self.model_cfg.to_dict(), "hardware": self.hw.to_dict(),
                       "sparsity": self.sparsity_cfg.to_dict()},
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"model state version {state.get('version')!r}: this StreamLIC reads version "
                             f"{STATE_VERSION} (and upgrades version 1); the checkpoint was written by a newer release")
        config = self.get_extra_state()["config"]
        mine = {f"{group}.{key}": value for group, values in {**config, "hardware": {
            **PER_LAYER_DEFAULTS, **config["hardware"]}}.items() for key, value in values.items()}
        for key, saved in checkpoint_fixed(state.get("config", {}), state.get("prepared", ())).items():
            if key.split(".")[0] in ("model", "hardware") and key != "hardware.name" and mine.get(key) != saved:
                raise ValueError(f"checkpoint was made with {key}={saved}, this model has {key}={mine.get(key)}")
        self.load_stage_state(state)

    @staticmethod
    def checkpoint_state_dict(path: str | Path) -> dict[str, Tensor]:
        """Model weights from a Lightning checkpoint (``model.`` prefix) or a plain state dict file."""
        path = Path(path)
        try:
            blob = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ValueError(f"{path}: not a readable checkpoint ({err})") from err
        state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: no state dict inside")
        if any(k.startswith("model.") for k in state):
            state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        if "_extra_state" not in state:
            raise ValueError(f"{path}: not a StreamLIC checkpoint (no stage state)")
        return state

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "StreamLIC":
        """Build the model with the configs stored in a checkpoint and load its weights and stage."""
        state = cls.checkpoint_state_dict(path)
        cfg = state["_extra_state"]["config"]
        model = cls(model=cfg["model"], hardware=cfg["hardware"], sparsity=cfg["sparsity"])
        model.load_state_dict(state)
        return model

    # ------------------------------------------------------------------ forward
    def _chains(self) -> dict[str, nn.Sequential]:
        return {name: getattr(self, name) for name in topology.SUBNETWORKS}

    def image_input(self, x: Tensor) -> Tensor:
        """The network input ``x - 0.5``; on the integer grid once quantized."""
        if self.quantized:
            hw = self.hw.for_layer(topology.IMAGE_READER)  # the image enters at the first layer's width
            return fxp.quantize_image(x, hw) * fxp.image_scale(hw)
        return x - 0.5

    def context_input(self, y_hat: Tensor) -> Tensor:
        """Rows above each latent row: pad (left 1, right 1, top 3), drop the last row."""
        return nn.functional.pad(y_hat[:, :, :-1], topology.CONTEXT_PAD)

    def entropy_params(self, params: Tensor, ctx: Tensor) -> Tensor:
        """ep on the concatenation ``(params, ctx)``, whose first layer adds the two halves: they are
        handed to it apart, saving a concatenation and its split in every call."""
        channel_addition, *layers = self.entropy_parameters
        out = channel_addition(params, ctx)
        for layer in layers:
            out = layer(out)
        return out

    def split_entropy_params(self, ep_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Means, scales and the integer scale index from the entropy-parameter output."""
        means, odd = ep_out[:, 0::2], ep_out[:, 1::2]
        if self.quantized:
            index = odd
            sigma = fxp.sigma_from_index(odd)
        else:
            sigma = fxp.sigma_from_v(odd)
            index = torch.clamp(torch.floor(fxp.scale_index_from_v(odd.detach()) + 0.5), 0, fxp.SCALE_INDEX_MAX)
        return means, sigma, index

    @property
    def grid_hw(self) -> HardwareConfig:
        """The datapath whose latent grid and ranges the stage computes on: the latent grid's (``hw.latent_hw``:
        ``hw`` itself unless per-layer widths give the grid another) from QAT on, before it
        :data:`fixedpoint.FLOAT_STAGE_HARDWARE` (float training does not depend on the bit widths)."""
        return self.hw.latent_hw if self.quantized else fxp.FLOAT_STAGE_HARDWARE

    def hyper_symbols(self, z: Tensor) -> Tensor:
        hw = self.grid_hw
        return fxp.hyper_symbols(z.detach() / hw.latent_scale, hw)

    @torch.no_grad()
    def decode_rows(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Causal hard quantization row by row, exactly as the decoder runs it.

        Returns ``y_hat``, the symbols and the entropy-parameter output of every row. A whole
        latent row is predicted at once from the three rows above it (:meth:`decode_row`; a
        compiled evaluation runs it through one compiled graph, see :meth:`rows_through`).
        """
        ls = self.grid_hw.latent_scale
        b, c, height, width = y.shape
        padded = topology.context_buffer(y, height, width)
        y_q = y / ls
        residuals = torch.empty_like(y)  # symbols before their clamp; clamped and counted once after the loop
        ep_rows = []
        row_step = self._row_step or type(self).decode_row
        for h in range(height):
            y_hat_row, residuals[:, :, h:h + 1], ep = row_step(self, topology.context_window(padded, h),
                                                               params[:, :, h:h + 1], y_q[:, :, h:h + 1])
            topology.context_interior(padded, h).copy_(y_hat_row)
            ep_rows.append(ep)
        self.clamped_symbols += (residuals.abs() > fxp.SYMBOL_MAX).sum()
        symbols = fxp.clamp_symmetric(residuals, fxp.SYMBOL_MAX)
        return topology.context_interior(padded), symbols, torch.cat(ep_rows, dim=2)

    def decode_row(self, window: Tensor, params_row: Tensor, y_q_row: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One latent row from the three decoded rows above it (``window``, padded): ŷ of the row, its
        symbols before their clamp and its entropy-parameter output."""
        hw = self.grid_hw
        ls = hw.latent_scale
        ep = self.entropy_params(params_row, self.context_prediction(window))
        mu_q = ep[:, 0::2] / ls
        residual = fxp.symbol_residual(y_q_row, mu_q, hw)
        row_symbols = fxp.clamp_symmetric(residual, fxp.SYMBOL_MAX)
        return fxp.dequantize_latent(row_symbols, mu_q, hw) * ls, residual, ep

    @contextlib.contextmanager
    def rows_through(self, row_step):
        """Run :meth:`decode_row` as ``row_step(model, window, params_row, y_q_row)`` (e.g. its compiled
        form: one graph for every row of every image of the same width) inside the block."""
        previous, self._row_step = self._row_step, row_step
        try:
            yield self
        finally:
            self._row_step = previous

    def _hyper(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Hyper-latent for the synthesis, its likelihoods and its integer symbols."""
        z_symbols = self.hyper_symbols(z)
        if self.pdf_training:
            channel = torch.arange(self.N, device=z.device).view(1, -1, 1, 1).expand_as(z_symbols)
            return z_symbols, self.rectified_cdf_z.likelihood(z_symbols, channel), z_symbols
        if self.training and not self.encoder_fixed:
            # compressai's EntropyBottleneck.forward(training=True) without the host syncs of its
            # tensor-valued permutation: the same noise draw, values and likelihoods
            values = z.transpose(0, 1).contiguous()  # channels first; contiguous so the noise fills it in order
            z_tilde = self.entropy_bottleneck.quantize(values.reshape(values.size(0), 1, -1), "noise")
            likelihood = self._factorized_likelihood(z_tilde)
            # contiguous, as compressai returns them (the loss's sum then adds in the same order)
            return (z_tilde.reshape(values.shape).transpose(0, 1).contiguous(),
                    likelihood.reshape(values.shape).transpose(0, 1).contiguous(), z_symbols)
        z_hat = straight_through(z, z_symbols)
        return z_hat, self._bottleneck_likelihood(z_hat), z_symbols

    def _bottleneck_likelihood(self, z_hat: Tensor) -> Tensor:
        """Factorized-model likelihood of integer hyper symbols (no median offset, as coded)."""
        values = z_hat.transpose(0, 1)  # channels first, as compressai's model expects
        likelihood = self._factorized_likelihood(values.reshape(values.size(0), 1, -1))
        return likelihood.reshape(values.shape).transpose(0, 1)

    def _factorized_likelihood(self, values: Tensor) -> Tensor:
        """The EntropyBottleneck's (lower-bounded) likelihood of channels-first values [C, 1, N]."""
        eb = self.entropy_bottleneck
        likelihood, _, _ = eb._likelihood(values)
        return eb.likelihood_lower_bound(likelihood) if eb.use_likelihood_bound else likelihood

    def _gaussian_likelihood(self, values: Tensor, sigma: Tensor) -> Tensor:
        gc = self.gaussian_conditional
        likelihood = gc._likelihood(values, sigma)
        if gc.use_likelihood_bound:
            likelihood = gc.likelihood_lower_bound(likelihood)
        return likelihood

    def _form_integers(self) -> None:
        """Form the integer parameters of every trainable layer for a QAT step (layers.batch)."""
        if self.quantized and torch.is_grad_enabled():
            trainable = [layer for layer in self._quant_layers if any(p.requires_grad for p in layer.parameters())]
            if trainable:
                self.integer_parameters.form(trainable)

    def forward(self, x: Tensor) -> dict[str, Any]:
        try:
            return self._forward(x)
        finally:  # what a forward gathers (ranges, integers in an autograd graph) never outlives it
            self.range_tracker.pending.clear()
            self.integer_parameters.current = {}

    def _forward(self, x: Tensor) -> dict[str, Any]:
        self.range_tracker.pending.clear()  # nothing from layers called on their own since
        self._form_integers()
        y = self.g_a(self.image_input(x))
        z = self.h_a(y)
        z_hat, z_likelihoods, z_symbols = self._hyper(z)
        params = self.h_s(z_hat)

        if self.training and not (self.encoder_fixed or self.pdf_training):
            # additive uniform noise on y (the latent grid step is 1 in real units)
            y_hat = y + torch.empty_like(y).uniform_(-0.5, 0.5)
            means, sigma, index = self.split_entropy_params(
                self.entropy_params(params, self.context_prediction(self.context_input(y_hat))))
            y_likelihoods = self._gaussian_likelihood(y_hat - means, sigma)
            symbols = None
        else:
            y_hat, symbols, ep_out = self.decode_rows(y.detach(), params.detach())
            if self.training and not self.pdf_training:
                # the same predictions again, batched over rows, to carry gradients to the context layers
                ep_out = self.entropy_params(params, self.context_prediction(self.context_input(y_hat)))
            means, sigma, index = self.split_entropy_params(ep_out)
            if self.pdf_training:
                y_likelihoods = self.rectified_cdf_y.likelihood(symbols, index)
            else:
                values = straight_through(y.detach() - means, symbols)
                y_likelihoods = self._gaussian_likelihood(values, sigma)

        x_hat = self.g_s(y_hat) + 0.5
        self.range_tracker.flush()
        return {
            "x_hat": x_hat,
            "likelihoods": {"y": y_likelihoods, "z": z_likelihoods},
            "y_symbols": symbols,
            "z_symbols": z_symbols,
            "pdf_index": index,
        }


def _upgrade_state_dict(module, state_dict, prefix, *args) -> None:
    """Map a version-1 state dict onto today's module paths (a load_state_dict pre-hook).

    The checkpoint's own version decides; nothing else is changed, so an upgraded checkpoint
    loads into the same stage with the same weights, buffers and flags.
    """
    extra_key = prefix + "_extra_state"
    extra = state_dict.get(extra_key)
    if not isinstance(extra, dict) or extra.get("version") != 1:
        return
    upsample = re.compile(rf"^{re.escape(prefix)}(h_s|g_s)\.(\d+)\.conv\.")
    context = re.compile(rf"^{re.escape(prefix)}context_prediction\.(\d+)\.")
    # renamed all at once: the shifted context paths overlap the old ones
    renamed = {}
    for key in [key for key in state_dict if upsample.match(key) or context.match(key)]:
        new = upsample.sub(rf"{prefix}\1.\2.", key)
        new = context.sub(lambda m: f"{prefix}context_prediction.{int(m.group(1)) + _V1_CONTEXT_SHIFT}.", new)
        renamed[new] = state_dict.pop(key)
    state_dict.update(renamed)
    flags = extra["flags"]
    state_dict[extra_key] = {"version": STATE_VERSION, "config": extra["config"], **stage_state_of_version_1(flags)}
    log.info("model state of version 1 mapped onto version %d module paths", STATE_VERSION)


ARLiteSparse_Q = StreamLIC
