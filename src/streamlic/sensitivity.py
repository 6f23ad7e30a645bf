"""The bit-width sensitivity study: each layer's RD-loss change at each width, the allocations it gives (README).

Method (FMPQ, arXiv 2506.01221): the validation RD loss of the float model, then the fractional
change of that loss when only one layer's weights (or only its output activations) are
quantized at ``W`` (``A``) bits, everything else float. A layer gets, for a tolerance β, the
lowest candidate width whose change is at most β; the context engine and the layers writing
the latent grid then take the widths the hardware gives them together (:func:`allocate`), and
every allocation is measured again as a whole at QAT entry, since layers measured one at a
time do not show how their errors add up.

The float model is the checkpoint's weights at stage 2 (masks applied, nothing quantized): a
later-stage checkpoint's stage state is read as stage 2 (its frozen scales are not used; its
tracked activation ranges, possibly raised at its QAT entry, are), so the study runs on the
weights it holds, however they were trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shlex
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from . import fixedpoint as fxp
from . import topology
from .config import W8A8, W12A12, ConfigError, HardwareConfig, ModelConfig, hardware_config, model_config
from .export.report import hardware_report
from .kinds import kind_of
from .layers import LAGC, QuantLayer
from .layers.quant import QuantizeWeight, activation_scale_of, weight_scale_of
from .model import StreamLIC
from .runs import CheckpointError, load_checkpoint, model_state
from .stage import Stage

log = logging.getLogger(__name__)

WIDTHS = (8, 10, 12)
TOLERANCES = (0.5, 1.0, 2.0)  # percent of the float model's RD loss
UNIFORM = (W12A12, W8A8)  # the reference points, conf/hardware/w12a12.yaml and w8a8.yaml
# what every config the study builds keeps of the checkpoint's own: the block size its masks are cut in and the
# accumulator, multiplier and shift widths; only the bit widths change
DATAPATH_KEYS = ("block_in", "block_out", "accumulator_bits", "multiplier_bits", "shift_bits")
# what is quantized, one at a time, and the hardware.layers key of its width (config.WIDTH_KEYS lists them all)
LAYER_WIDTH_KEY = {"weight": "weight_bits", "activation": "activation_bits"}
QUANTIZED = tuple(LAYER_WIDTH_KEY)


@dataclass
class Source:
    """What the study reads from a checkpoint: its configs, its weights as a stage-2 state, its loss."""

    stage: str  # the checkpoint's own
    configs: dict[str, Any]  # the model's "model", "hardware" and "sparsity" configs
    state: dict[str, Tensor]
    loss: dict[str, Any]  # StreamLICModule's lmbda, distortion, quality
    data: dict[str, Any] = field(default_factory=dict)  # the run's StreamLICDataModule arguments

    @property
    def model_cfg(self) -> ModelConfig:
        return model_config(self.configs["model"])


def read_source(path: Path) -> Source:
    """A stage-2-or-later Lightning checkpoint; anything else is one :class:`CheckpointError` naming it."""
    checkpoint = load_checkpoint(path, "CKPT")
    state = model_state(checkpoint, path, "CKPT")
    extra = state["_extra_state"]
    if Stage.of(extra["stage"]) < Stage.MASK:
        raise CheckpointError(f"CKPT={path}: a stage-1 ({extra['stage']}) checkpoint; the study needs stage 2 "
                              f"({Stage.MASK.label}) or later, whose block masks are cut")
    settings = checkpoint.get("hyper_parameters")
    if not isinstance(settings, dict) or "lmbda" not in settings:
        raise CheckpointError(f"CKPT={path}: no training settings (lambda) inside; give a stage checkpoint "
                              "written by train.py (stageN-*.ckpt)")
    stage2 = {**extra, "stage": Stage.MASK.label, "masked": True, "prepared": ["masks"]}
    return Source(extra["stage"], extra["config"], {**state, "_extra_state": stage2},
                  {key: settings.get(key) for key in ("lmbda", "distortion", "quality")},
                  dict(checkpoint.get("datamodule_hyper_parameters") or {}))


def validation_loader(source: Source, folder: Path | None, crop: int | None = None):
    """The validation set of the checkpoint's run (the demo photos' without one), or ``folder``'s images,
    at the run's validation crop (or ``crop``: the run's ``data.val_patch_size`` then) and batch size."""
    from .data import StreamLICDataModule

    settings = dict(source.data or {"source": "demo"})
    if folder is not None:
        settings.update(source="folder", val_dir=str(folder))
    if crop is not None:
        settings.update(val_patch_size=crop)
    datamodule = StreamLICDataModule(**settings)
    datamodule.setup("validate")
    return datamodule.val_dataloader()


def model_at_stage2(source: Source, hardware: HardwareConfig | dict) -> StreamLIC:
    """The checkpoint's weights in a model built for ``hardware``, at stage 2 (float, masked)."""
    model = StreamLIC(model=source.configs["model"], hardware=hardware, sparsity=source.configs["sparsity"])
    model.load_state_dict(source.state)
    return model


def on_datapath(hw: HardwareConfig, datapath: HardwareConfig) -> HardwareConfig:
    """``hw``'s widths on ``datapath``'s blocks, accumulator, multiplier and shift (:data:`DATAPATH_KEYS`)."""
    return dataclasses.replace(hw, **{key: getattr(datapath, key) for key in DATAPATH_KEYS})


def uniform_config(width: int, datapath: HardwareConfig = W12A12) -> HardwareConfig:
    """``W = A = width`` with the default datapath's residual bits, on ``datapath``: the formats one layer is
    measured at."""
    try:
        return on_datapath(dataclasses.replace(W12A12, activation_bits=width, weight_bits=width,
                                               precision_bits=width + W12A12.residual_bits, name=f"w{width}a{width}"),
                           datapath)
    except ConfigError as err:
        raise ConfigError(f"--widths {width}: not a width the datapath allows ({err})") from None


# ---------------------------------------------------------------------------- one layer quantized

def quantized_weight(layer: QuantLayer) -> tuple[Tensor, Tensor]:
    """The parameter a layer holds as W-bit integers (an LAGC's affine weight), and its values as used (masked)."""
    if isinstance(layer, LAGC):
        return layer.affine.weight, layer.affine.weight
    return layer.weight, layer.effective_weight()


def fake_quantized(weight: Tensor, hw: HardwareConfig) -> Tensor:
    """``weight`` on its W-bit grid: per output channel symmetric, the scale from ``max|w_c|`` as QAT entry
    captures it, rounded and clamped by :class:`QuantizeWeight`."""
    absmax = weight.abs().amax(dim=(1, 2, 3), keepdim=True)
    scale64 = weight_scale_of(absmax.double(), hw)
    bound = torch.round(absmax.double() / scale64)
    q = QuantizeWeight.apply(weight, scale64, -bound, bound, weight_scale_of(absmax, hw), absmax, None)
    return (q.double() * scale64).to(weight.dtype)


@contextlib.contextmanager
def weights_at(layer: QuantLayer, hw: HardwareConfig) -> Iterator[None]:
    """Inside the block, ``layer`` computes with its weights at ``hw.weight_bits``."""
    parameter, used = quantized_weight(layer)
    saved = parameter.detach().clone()
    with torch.no_grad():
        parameter.copy_(fake_quantized(used.detach(), hw))
    try:
        yield
    finally:
        with torch.no_grad():
            parameter.copy_(saved)


def on_grid(out: Tensor, step: Tensor | float, bound: Tensor | float) -> Tensor:
    """``out`` clamped to +-``bound`` and rounded to multiples of ``step``."""
    return torch.round(torch.clamp(out, -bound, bound) / step) * step


@contextlib.contextmanager
def activations_at(layer: QuantLayer, spec: topology.LayerSpec, hw: HardwareConfig) -> Iterator[None]:
    """Inside the block, ``layer``'s output is at ``hw.activation_bits``.

    A learned scale: ``act_absmax / (2**(A-1) - 1)`` from the tracked range, as QAT entry freezes it,
    and the A-bit clamp. A fixed-scale layer writes the latent grid: step ``2**-(A-8)`` and its A-bit
    range (y's: the symbol range ``127 * 2**(A-8)``) replace the 12-bit ones of the float stages; the
    scale index's channels (``pdf_index``) keep theirs, as the index table, not A, sets their step. The
    layer reading the image sets the image's range too (8-bit pixels kept whole from A = 9 on, halved
    at A = 8): its input is quantized as well.
    """
    if layer.fixed_scale is None:
        scale = activation_scale_of(layer.act_absmax, hw)
        handles = [layer.register_forward_hook(lambda module, args, out: on_grid(out, scale, hw.act_max * scale))]
        if topology.producers().get(spec.path) == topology.IMAGE:  # the input is x - 0.5
            handles.append(layer.register_forward_pre_hook(
                lambda module, args: (fxp.quantize_image(args[0] + 0.5, hw) * fxp.image_scale(hw),)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        return
    step, bound = fxp.fixed_scale_range(hw, latent=spec.role == "latent")
    float_range = layer.float_range

    def fixed_grid(out: Tensor) -> Tensor:  # in place of QuantLayer._fake_quant_fixed, on the layer's raw output
        grid = on_grid(out, step, bound)
        if spec.role == "pdf_index":
            grid[:, 1::2] = on_grid(out[:, 1::2], *float_range)
        return grid

    layer._fake_quant_fixed = fixed_grid
    try:
        yield
    finally:
        del layer._fake_quant_fixed


def weighted_specs(cfg: ModelConfig) -> dict[str, topology.LayerSpec]:
    return {spec.path: spec for spec in topology.layers(cfg) if spec.weighted}


def measure_layers(model: StreamLIC, loss: Callable[[], float], widths: tuple[int, ...]) -> dict[str, dict]:
    """``{path: {"weight": {W: change}, "activation": {A: change}}}``: the fractional change of ``loss()``
    with only that layer's weights (activations) quantized, for every weighted layer."""
    float_loss = loss()
    changes = {}
    for path, spec in weighted_specs(model.model_cfg).items():
        layer = model.get_submodule(path)
        changes[path] = {kind: {} for kind in QUANTIZED}
        for width in widths:
            hw = uniform_config(width)
            for kind, context in (("weight", weights_at(layer, hw)), ("activation", activations_at(layer, spec, hw))):
                with context:
                    changes[path][kind][width] = loss() / float_loss - 1.0
        log.info("%s: weights %s, activations %s", path,
                 *(" ".join(f"{w}:{100 * c:+.2f}%" for w, c in changes[path][kind].items()) for kind in QUANTIZED))
    return changes


def measurement_resolution(changes: dict[str, dict], widths: tuple[int, ...]) -> dict[str, Any]:
    """The largest |change| at the widest candidate width, where a layer's quantization is nearly exact: what the
    validation set's loss moves by for any small perturbation. Tolerances below it choose on noise."""
    change, path, kind = max((abs(entry[kind][widths[-1]]), path, kind)
                             for path, entry in changes.items() for kind in QUANTIZED)
    return {"change": change, "layer": path, "kind": kind, "bits": widths[-1]}


# ---------------------------------------------------------------------------- allocations

def allocate(changes: dict[str, dict], widths: tuple[int, ...], tolerance: float,
             cfg: ModelConfig) -> dict[str, dict[str, int]]:
    """Per weighted layer ``{"weight_bits", "activation_bits"}`` for a tolerance (percent).

    Each layer: the lowest candidate width whose change is within the tolerance (else the widest).
    Then what the hardware ties together: the context engine runs on one width (the widest its
    layers chose, weights and activations), and the layers writing the latent grid output at the
    latent width L, which is the entropy path's, so L is the widest activation width any of them chose.
    """
    def lowest(path: str, kind: str) -> int:
        return min((w for w in widths if changes[path][kind][w] <= tolerance / 100), default=max(widths))

    chosen = {path: {LAYER_WIDTH_KEY[kind]: lowest(path, kind) for kind in QUANTIZED} for path in changes}
    engine = list(topology.sparse_paths(cfg).values())
    on_latent_grid = engine + [path for path in topology.LATENT_GRID_WRITERS if path not in engine]
    engine_weight_bits = max(chosen[path]["weight_bits"] for path in engine)
    latent_bits = max(chosen[path]["activation_bits"] for path in on_latent_grid)
    for path in engine:
        chosen[path]["weight_bits"] = engine_weight_bits
    for path in on_latent_grid:
        chosen[path]["activation_bits"] = latent_bits
    return chosen


def layer_overrides(chosen: dict[str, dict[str, int]], base: HardwareConfig, cfg: ModelConfig) -> dict[str, dict]:
    """The ``hardware.layers`` mapping giving ``chosen`` over ``base``: per sub-network and key, its most common
    value under the sub-network's name (left out where it is ``base``'s) and each other one under its layer's path.

    The layers writing the latent grid take its width from the config's own rule (the entropy path's width,
    which the pdf-index layer's key sets), so theirs is not given.
    """
    writers = set(topology.LATENT_GRID_WRITERS) - {topology.layer_with(cfg, role="pdf_index").path}
    overrides: dict[str, dict[str, int]] = {}
    for name, specs in topology.network(cfg).items():
        for key in LAYER_WIDTH_KEY.values():
            values = {spec.path: chosen[spec.path][key] for spec in specs
                      if spec.weighted and not (key == "activation_bits" and spec.path in writers)}
            common = Counter(values.values()).most_common(1)[0][0]
            if common != getattr(base, key):
                overrides.setdefault(name, {})[key] = common
            for path, value in values.items():
                if value != common:
                    overrides.setdefault(path, {})[key] = value
    return overrides


def allocation_config(chosen: dict[str, dict[str, int]], name: str, cfg: ModelConfig,
                      datapath: HardwareConfig = W12A12) -> HardwareConfig:
    """The hardware config of an allocation over the default widths on ``datapath``; its own validation judges it."""
    return dataclasses.replace(on_datapath(W12A12, datapath), layers=layer_overrides(chosen, W12A12, cfg), name=name)


def override_line(checkpoint: Path, hw: HardwareConfig) -> str:
    """The command that trains ``hw``'s per-layer widths (and its name) from ``checkpoint``."""
    sets = [f"+hardware.layers.{key}.{width}={value}" for key, widths in dict(hw.layers).items()
            for width, value in widths.items()]
    return shlex.join(["python", "train.py", f"init_from={checkpoint}", f"hardware.name={hw.name}", *sets])


def hardware_cost(model: StreamLIC) -> dict[str, Any]:
    """The bit cost of a quantized model from its hardware report (:func:`export.report.hardware_report`, its
    image size): Σ MACs/px × W × A_in (the multiplier-area proxy; A_in: the width of the layer's input) and
    Σ weights × W (weight memory, bits; a block-sparse layer's kept weights), with each layer's widths and size."""
    params = model.export_quantized_parameters()
    blocks = {name: layer.blocks_per_group for name, layer in model.sparse_layers().items()}
    report = hardware_report(params, model.hw, model.model_cfg, blocks)
    pixels = report["image_size"][0] * report["image_size"][1]
    specs = weighted_specs(model.model_cfg)
    layers = {}
    for entry in report["layers"]:
        path = entry["layer"]
        mask = params[path].get("mask")
        weights = int(mask.sum()) if mask is not None else params[path][kind_of(specs[path]).weight_field].numel()
        layers[path] = {"weight_bits": entry["weight_bits"], "activation_bits": entry["activation_bits"],
                        "input_bits": entry["input_bits"], "macs_per_pixel": entry["macs_sparse"] / pixels,
                        "weights": weights}
    return {"bit_cost": report["totals"]["bit_macs_per_pixel_sparse"], "image_size": report["image_size"],
            "weight_memory_bits": sum(layer["weights"] * layer["weight_bits"] for layer in layers.values()),
            "layers": layers}


# ---------------------------------------------------------------------------- the study

def run_study(checkpoint: Path, data: Path | None = None, widths: Sequence[int] | None = None,
              tolerances: Sequence[float] | None = None, crop: int | None = None) -> dict[str, Any]:
    """Measure every layer, allocate per tolerance, measure the allocations and the uniform configs at QAT entry
    (``None``: :data:`WIDTHS`, :data:`TOLERANCES`, the run's validation crop)."""
    from .lightning_module import StreamLICModule

    start = time.perf_counter()
    widths = tuple(sorted(set(widths or WIDTHS)))
    tolerances = tuple(tolerances or TOLERANCES)
    if any(t < 0 for t in tolerances):
        raise ConfigError(f"--tolerances {' '.join(map(str, tolerances))}: must not be negative")
    source = read_source(checkpoint)
    cfg = source.model_cfg
    datapath = hardware_config(source.configs["hardware"])
    widest = [uniform_config(width, datapath) for width in widths][-1]  # each width checked
    try:  # the widest uniform datapath bounds every allocation's accumulators: checked before, not after, the study
        cfg.validate_against(widest)
    except ConfigError as err:
        raise ConfigError(f"--widths {widths[-1]}: too wide for this model ({err})") from None
    uniform_configs = [on_datapath(hw, datapath) for hw in UNIFORM]
    for hw in uniform_configs:  # the reference points too
        cfg.validate_against(hw)
    loader = validation_loader(source, data, crop)

    def evaluate(model: StreamLIC) -> dict[str, float]:
        return StreamLICModule(model, **source.loss).evaluate(loader)

    float_model = model_at_stage2(source, datapath)
    float_module = StreamLICModule(float_model, **source.loss)
    float_metrics = float_module.evaluate(loader)
    changes = measure_layers(float_model, lambda: float_module.evaluate(loader)["loss"], widths)

    def measured(name: str, hw: HardwareConfig, tolerance: float | None) -> dict[str, Any]:
        model = model_at_stage2(source, hw)
        model.enter_stage(Stage.QAT.label)
        metrics = evaluate(model)
        record = {"name": name, "tolerance_percent": tolerance, "hardware": hw.to_dict(),
                  "latent_bits": hw.latent_width, **hardware_cost(model),
                  "qat_entry": {**metrics, "change": metrics["loss"] / float_metrics["loss"] - 1.0},
                  "override": override_line(checkpoint, hw)}
        log.info("%s: bit cost %.4g, QAT-entry RD-loss change %+.2f %%", name, record["bit_cost"],
                 100 * record["qat_entry"]["change"])
        return record

    resolution = measurement_resolution(changes, widths)
    allocations = []
    for tolerance in tolerances:
        if tolerance / 100 < resolution["change"]:
            log.warning("--tolerances %g: below the study's resolution, %.2f %% (%s's %s at %d bits): its allocation "
                        "chooses on noise; use more validation pixels (--crop, --data)", tolerance,
                        100 * resolution["change"], resolution["layer"], resolution["kind"], widths[-1])
        chosen = allocate(changes, widths, tolerance, cfg)
        allocations.append(measured(f"beta={tolerance:g}%",
                                    allocation_config(chosen, f"beta{tolerance:g}", cfg, datapath), tolerance))
    uniform = [measured(hw.name, hw, None) for hw in uniform_configs]
    return {"checkpoint": str(checkpoint), "stage": source.stage,
            "data": str(data) if data is not None else f"the run's validation set ({source.data.get('source', 'demo')})",
            "images": len(loader.dataset), "crop": crop, "loss": source.loss, "widths": list(widths),
            "tolerances_percent": list(tolerances), "resolution": resolution,
            "float": float_metrics, "changes": {path: {kind: {str(w): c for w, c in per.items()}
                                                       for kind, per in entry.items()} for path, entry in changes.items()},
            "allocations": allocations, "uniform": uniform,
            "seconds": time.perf_counter() - start}
