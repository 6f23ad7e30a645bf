"""The export package: every file of a QAT-or-later model in one directory, with its manifest.

``params.pt`` (the research code's parameter dict), ``params.npz`` and ``streamlic_params.h``
(hardware widths), the engine's streams, the CDF tables, golden vectors, the hardware report
and ``manifest.json`` (shapes, scales, bit widths, configs, model hash, files with SHA-256).
See docs/export-format.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import fixedpoint as fxp
from ..config import hardware_config, model_config
from ..formats import CDF_PRECISION, bit_widths, layer_bit_widths
from ..integer_model import IntegerModel
from ..params import ExportError, export_quantized_parameters, require_integer_stage, research_parameter_dict
from ..topology import padded_size
from .golden import CORNER_DIR, GOLDEN_TENSORS, golden_vectors, write_rows
from .header import c_header, compact
from .report import REPORT_SIZE, format_hardware_report, hardware_report
from .streams import STREAM_FILES, context_engine, hls_streams, parse_hls_streams, read_ints, sparse_layer_info

log = logging.getLogger(__name__)

EXPORT_FORMAT = "streamlic-export"
EXPORT_VERSION = 1


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prepare_output_dir(directory: Path, force: bool) -> None:
    """Refuse a non-empty directory unless ``force``; then remove the files a previous export listed.

    Only what an export owns (the files its manifest lists) is removed, so nothing of an
    earlier model survives next to the new one, and nothing else in the directory is touched.
    """
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{directory}: exists and is not a directory")
    if not directory.exists() or not any(directory.iterdir()):
        return
    if not force:
        raise ExportError(f"{directory}: not empty; choose a new directory or pass --force to replace the "
                          "export in it")
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        return
    try:
        owned = json.loads(manifest_path.read_text()).get("files", {})
    except json.JSONDecodeError as err:
        raise ExportError(f"{manifest_path}: not valid JSON ({err}); remove the directory by hand") from err
    for name in owned:
        path = (directory / name).resolve()
        if directory.resolve() in path.parents:  # a manifest cannot make us delete outside the export
            path.unlink(missing_ok=True)
    manifest_path.unlink()
    for folder in sorted({(directory / name).parent for name in owned}, key=lambda p: len(p.parts), reverse=True):
        while folder != directory and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


def export_package(model, out_dir: str | Path, image: Tensor | None = None,
                   image_name: str | None = None, force: bool = False) -> dict[str, Path]:
    """Write the hardware package of a QAT-or-later model into ``out_dir``; returns the written paths.

    ``image`` [3, H, W] in [0, 1] (any size; padded to a multiple of 64) adds golden vectors.
    Every check (stage, number ranges, block counts, accumulator widths) runs before the
    first file is written. A non-empty ``out_dir`` is refused unless ``force``, which first
    removes the files of the export already there.
    """
    require_integer_stage(model, "export")
    hw, model_cfg = model.hw, model.model_cfg
    engine = context_engine(hw, model_cfg)  # a config the FPGA's row engine cannot run is refused first
    params = export_quantized_parameters(model)
    integer_model = IntegerModel.from_model(model, params=params)
    blocks_per_group = {short: layer.blocks_per_group for short, layer in model.sparse_layers().items()}
    streams, sections = hls_streams(params, hw, model_cfg, blocks_per_group)
    input_size = tuple(image.shape[-2:]) if image is not None else None
    height, width = padded_size(*input_size) if input_size else REPORT_SIZE
    report = hardware_report(params, hw, model_cfg, blocks_per_group, height, width, input_size)

    directory = Path(out_dir)
    _prepare_output_dir(directory, force)
    directory.mkdir(parents=True, exist_ok=True)
    tables = {"cdf_y": integer_model.cdf_y, "cdf_z": integer_model.cdf_z, "tanh_lut": integer_model.tanh_lut}
    written: dict[str, Path] = {}

    def path_of(name: str) -> Path:
        written[name] = directory / name
        return written[name]

    torch.save(research_parameter_dict(params), path_of("params.pt"))
    stored = {layer: {key: compact(key, value, hw.for_layer(layer)) for key, value in layer_params.items()}
              for layer, layer_params in params.items()}
    arrays = {f"{layer}/{key}": value.numpy() for layer, layer_params in stored.items()
              for key, value in layer_params.items()}
    arrays.update({f"tables/{name}": table.numpy() for name, table in tables.items()})
    with open(path_of("params.npz"), "wb") as handle:
        np.savez(handle, **arrays)
    path_of("streamlic_params.h").write_text(c_header(params, tables, hw, model_cfg, integer_model.model_hash))
    for name, stream_lines in streams.items():
        path_of(name).write_text("".join(line + "\n" for line in stream_lines))
    write_rows(path_of("cdf_y.txt"), integer_model.cdf_y)
    write_rows(path_of("cdf_z.txt"), integer_model.cdf_z)
    golden = None
    if image is not None:
        golden = golden_vectors(integer_model, image, directory / "golden")
        golden["image"] = image_name
        for file_name in GOLDEN_TENSORS:
            written[f"golden/{file_name}"] = directory / "golden" / file_name
        for file_name in golden["corner"]["files"]:
            written[f"golden/{CORNER_DIR}/{file_name}"] = directory / "golden" / CORNER_DIR / file_name
    path_of("hardware_report.json").write_text(json.dumps(report, indent=2) + "\n")
    path_of("hardware_report.txt").write_text(format_hardware_report(report))

    manifest = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model_hash": integer_model.model_hash,
        "stage": model.stage,
        "config": {"model": model_cfg.to_dict(), "hardware": hw.to_dict(), "sparsity": model.sparsity_cfg.to_dict()},
        "bit_widths": bit_widths(hw),  # the global widths (every layer's, in a uniform config)
        "layer_bit_widths": layer_bit_widths(hw, params),
        "context_engine": engine,
        "layers": {layer: {key: ({"shape": list(value.shape),
                                  "dtype": str(stored[layer][key].dtype).removeprefix("torch.")}
                                 if not value.is_floating_point()
                                 else float(value))
                           for key, value in layer_params.items()}
                   for layer, layer_params in params.items()},
        "context_layers": sparse_layer_info(params, hw, model_cfg, blocks_per_group),
        "hls_streams": sections,
        "cdf": {"tables": {"cdf_y": list(integer_model.cdf_y.shape), "cdf_z": list(integer_model.cdf_z.shape)},
                "symbol_offset": -fxp.SYMBOL_MAX, "precision": CDF_PRECISION,
                "note": "column j of a row is the cumulative frequency below symbol j - 127; the last column "
                        "closes the overflow slot"},
        "golden": golden,
        "files": {name: {"sha256": _sha256(path), "bytes": path.stat().st_size} for name, path in written.items()},
    }
    path_of("manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("exported %s (model %s…) to %s", model.stage, integer_model.model_hash[:12], directory)
    return written


def load_export(directory: str | Path) -> dict[str, Any]:
    """Read an export back: params (npz, with ctx1/ctx2/ep from the HLS streams), tables, configs, hash."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{directory}: no manifest.json; not a StreamLIC export directory")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path}: not valid JSON ({err})") from err
    if manifest.get("format") != EXPORT_FORMAT or manifest.get("version") != EXPORT_VERSION:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                         f"expected {EXPORT_FORMAT!r} version {EXPORT_VERSION}")
    for name in ("params.npz", "cdf_y.txt", "cdf_z.txt", *STREAM_FILES):
        if not (directory / name).is_file():
            raise ValueError(f"{directory}: {name} is missing; the export is incomplete")
    hw = hardware_config(manifest["config"]["hardware"])
    model_cfg = model_config(manifest["config"]["model"])
    params: dict[str, dict[str, Tensor]] = {}
    tables: dict[str, Tensor] = {}
    with np.load(directory / "params.npz") as arrays:
        for key in arrays.files:
            group, name = key.split("/", 1)
            tensor = torch.from_numpy(arrays[key].copy())
            if not tensor.is_floating_point():
                tensor = tensor.to(torch.int64)
            if group == "tables":
                tables[name] = tensor
            else:
                params.setdefault(group, {})[name] = tensor
    for layer, stream_params in parse_hls_streams(directory, manifest, hw, model_cfg).items():
        params[layer].update(stream_params)
    cdf_y = torch.tensor(read_ints(directory / "cdf_y.txt"), dtype=torch.int32)
    cdf_z = torch.tensor(read_ints(directory / "cdf_z.txt"), dtype=torch.int32)
    shapes = manifest["cdf"]["tables"]
    if "tanh_lut" not in tables:
        raise ValueError(f"{directory / 'params.npz'}: tables/tanh_lut is missing")
    return {"params": params, "hw": hw, "model_cfg": model_cfg, "tanh_lut": tables["tanh_lut"],
            "cdf_y": _reshape_table(cdf_y, shapes["cdf_y"], directory / "cdf_y.txt"),
            "cdf_z": _reshape_table(cdf_z, shapes["cdf_z"], directory / "cdf_z.txt"),
            "model_hash": manifest["model_hash"], "manifest": manifest}


def load_integer_model(directory: str | Path, context_engine: str = "sparse") -> IntegerModel:
    """The integer model an export directory describes (npz, HLS streams, CDF tables, manifest).

    The model hash of the files must equal the manifest's: a modified or mixed-up export is refused.
    """
    parts = load_export(directory)
    model = IntegerModel(parts["params"], hw=parts["hw"], model_cfg=parts["model_cfg"], cdf_y=parts["cdf_y"],
                         cdf_z=parts["cdf_z"], tanh_lut=parts["tanh_lut"], context_engine=context_engine)
    if model.model_hash != parts["model_hash"]:
        raise ValueError(f"{directory}: the exported files give model hash {model.model_hash[:16]}…, the "
                         f"manifest says {parts['model_hash'][:16]}…; the files were modified or mixed "
                         "from different exports")
    return model


def _reshape_table(values: Tensor, shape: list[int], path: Path) -> Tensor:
    if values.numel() != math.prod(shape):
        raise ValueError(f"{path}: {values.numel()} integers, expected a {shape[0]} x {shape[1]} table")
    return values.reshape(shape)
