"""Per-job results of a training run and the summary table of a Hydra multirun.

Every ``train.py`` job writes ``results.json`` into its output directory. At the end of a
multirun, :class:`SweepSummary` (a Hydra callback registered under ``hydra.callbacks`` in
``conf/config.yaml``) reads them all and writes ``summary.csv`` and ``summary.md`` into the
sweep directory: one row per job with its overrides, status, rate, quality and the
multiply-accumulates of the block-sparse context layers.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SUMMARY_STEM = "summary"
LATENT_DOWNSAMPLING = 16  # one latent position per 16 x 16 image pixels


def context_macs_per_pixel(model) -> dict[str, Any]:
    """Multiply-accumulates per image pixel of the sparse context layers (ctx1, ctx2, ep), dense and sparse.

    Each layer runs once per latent position. Its sparse count is the number of weights the
    mask keeps once masks are set, and the configured ``blocks per group x PI x PO`` per
    output group before that.
    """
    per_pixel = 1.0 / LATENT_DOWNSAMPLING**2
    layers = {}
    for name, layer in model.sparse_layers().items():
        kh, kw = layer.kernel_size
        dense = layer.out_channels * layer.in_channels * kh * kw
        if layer.mask_set:
            sparse = int(layer.mask.count_nonzero())
        else:
            sparse = layer.out_groups * layer.blocks_per_group * layer.block_in * layer.block_out
        layers[name] = {"dense": dense * per_pixel, "sparse": sparse * per_pixel, "density": sparse / dense,
                        "blocks_per_group": layer.blocks_per_group}
    dense_total = sum(entry["dense"] for entry in layers.values())
    sparse_total = sum(entry["sparse"] for entry in layers.values())
    return {"dense": dense_total, "sparse": sparse_total, "density": sparse_total / dense_total, "layers": layers}


def write_results(output_dir: str | Path, results: dict[str, Any]) -> Path:
    path = Path(output_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path


def _job_sort_key(path: Path) -> tuple[int, str]:
    name = path.parent.name
    return (int(name), name) if name.isdigit() else (1 << 30, name)


COLUMNS = ("job", "overrides", "status", "stage", "test_bpp", "test_psnr", "test_ms_ssim", "val_bpp", "val_psnr",
           "ctx_sparse_macs_per_px", "ctx_dense_macs_per_px", "ctx_density")


def summary_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job directory under ``sweep_dir`` that holds a ``results.json``."""
    rows = []
    for path in sorted(Path(sweep_dir).glob(f"*/{RESULTS_FILE}"), key=_job_sort_key):
        results = json.loads(path.read_text())
        test, val = results.get("test") or {}, results.get("val") or {}
        macs = results.get("context_macs_per_pixel") or {}
        rows.append({
            "job": path.parent.name,
            "overrides": " ".join(results.get("overrides", [])),
            "status": results.get("status", "?"),
            "stage": results.get("stage"),
            "test_bpp": test.get("bpp"), "test_psnr": test.get("psnr"), "test_ms_ssim": test.get("ms_ssim"),
            "val_bpp": val.get("bpp"), "val_psnr": val.get("psnr"),
            "ctx_sparse_macs_per_px": macs.get("sparse"), "ctx_dense_macs_per_px": macs.get("dense"),
            "ctx_density": macs.get("density"),
        })
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[column]) for column in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | Path, stem: str = SUMMARY_STEM) -> list[dict[str, Any]]:
    """Write ``<stem>.csv`` and ``<stem>.md`` into ``sweep_dir``; returns the rows."""
    sweep_dir = Path(sweep_dir)
    rows = summary_rows(sweep_dir)
    with open(sweep_dir / f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / f"{stem}.md").write_text(markdown_table(rows))
    return rows


class SweepSummary(Callback):
    """Hydra callback: the multirun summary table, written when all jobs have returned."""

    def __init__(self, stem: str = SUMMARY_STEM) -> None:
        self.stem = stem

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir, self.stem)
        if not rows:
            log.warning("multirun summary: no %s found under %s", RESULTS_FILE, sweep_dir)
            return
        log.info("multirun summary (%d jobs) written to %s:\n%s", len(rows), sweep_dir / f"{self.stem}.md",
                 markdown_table(rows))
