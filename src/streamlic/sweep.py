"""Per-job results of a training run and the summary of a Hydra multirun.

Every ``train.py`` job writes ``results.json`` into its output directory. At the end of a
multirun, :class:`SweepSummary` (a Hydra callback registered under ``hydra.callbacks`` in
``conf/config.yaml``) reads them all and writes into the sweep directory:

- ``summary.csv`` and the jobs table of ``summary.md``: one row per job with its overrides,
  status, group, rate, quality, the multiply-accumulates of the block-sparse context layers
  and the validation RD point at the end of every stage (from the job's stage report);
- ``summary_groups.csv`` and the groups table of ``summary.md``: jobs grouped by every
  override except the rate-distortion trade-off (``module.lmbda``, ``module.quality``), so
  each group is one RD curve per stage. For each group: the BD-rate of stage 5 against
  stage 1 of the same jobs (what hardware readiness costs) and of the group's stage-5 curve
  against a reference group's (by default the densest), with the sparse MACs per pixel;
- ``rd.png`` (one curve per group, stage 5 solid, stage 1 dashed) and ``bd_rate_macs.png``
  (BD-rate against the reference over sparse MACs per pixel).

Jobs whose status is not ``finished`` are marked in the tables, left out of the curves,
named in one ERROR line, and make the multirun exit with status 1. Jobs that train the same
model (equal blocks per group in every sparse layer, all other overrides equal) are flagged.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from . import topology
from .stage import STAGES
from .rd import MIN_POINTS, bd_deltas

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SUMMARY_STEM = "summary"
RD_PLOT = "rd.png"
BD_MACS_PLOT = "bd_rate_macs.png"
FINISHED = "finished"
LAMBDA_KEYS = ("module.lmbda", "module.quality")  # the points along one RD curve
DENSITY_KEYS = ("sparsity.density", "sparsity.layers")  # overrides that only change blocks per group
FIRST_STAGE, LAST_STAGE = STAGES[0], STAGES[-1]


def context_macs_per_pixel(model) -> dict[str, Any]:
    """Multiply-accumulates per image pixel of the sparse context layers (ctx1, ctx2, ep), dense and sparse.

    Each layer runs once per latent position. Its sparse count is the number of weights the
    mask keeps once masks are set, and the configured ``blocks per group x PI x PO`` per
    output group before that.
    """
    per_pixel = 1.0 / topology.LATENT_STRIDE**2
    layers = {}
    for name, layer in model.sparse_layers().items():
        spec = topology.layer_with(model.model_cfg, sparse=name)
        dense = topology.macs_per_position(spec)
        if layer.mask_set:
            active = int(layer.mask.count_nonzero())
        else:
            active = layer.out_groups * layer.blocks_per_group * layer.block_in * layer.block_out
        sparse = topology.macs_per_position(spec, active)
        layers[name] = {"dense": dense * per_pixel, "sparse": sparse * per_pixel,
                        "density": topology.density(sparse, dense), "blocks_per_group": layer.blocks_per_group}
    dense_total = sum(entry["dense"] for entry in layers.values())
    sparse_total = sum(entry["sparse"] for entry in layers.values())
    return {"dense": dense_total, "sparse": sparse_total, "density": topology.density(sparse_total, dense_total),
            "layers": layers}


def write_results(output_dir: str | Path, results: dict[str, Any]) -> Path:
    path = Path(output_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path


# ---------------------------------------------------------------------------- jobs

def override_key(override: str) -> str:
    """The config key of a command-line override (``+sparsity.layers.ctx1=0.25`` -> ``sparsity.layers.ctx1``)."""
    return override.split("=", 1)[0].lstrip("+~")


@dataclass
class Job:
    """One multirun job: its directory name, overrides and ``results.json`` (empty if it wrote none)."""

    number: str
    overrides: list[str]
    results: dict[str, Any]
    status: str

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def rd_overrides(self) -> list[str]:
        """The overrides that pick the point on an RD curve."""
        return [o for o in self.overrides if override_key(o) in LAMBDA_KEYS]

    @property
    def curve_overrides(self) -> tuple[str, ...]:
        """Every other override: jobs that share them lie on one RD curve."""
        return tuple(sorted(o for o in self.overrides if override_key(o) not in LAMBDA_KEYS))

    def stage_point(self, stage: str) -> tuple[float, float] | None:
        """Validation (bpp, PSNR) at the end of ``stage`` (``None``: the stage did not finish in this job)."""
        for row in self.results.get("stage_report") or []:
            end = row.get("end") or {}
            if row.get("stage") == stage and "bpp" in end and "psnr" in end:
                return end["bpp"], end["psnr"]
        return None

    def blocks_per_group(self) -> tuple[tuple[str, int], ...] | None:
        layers = (self.results.get("context_macs_per_pixel") or {}).get("layers")
        if not layers:
            return None
        return tuple(sorted((name, entry["blocks_per_group"]) for name, entry in layers.items()))


def _job_sort_key(path: Path) -> tuple[int, str]:
    return (int(path.name), path.name) if path.name.isdigit() else (1 << 30, path.name)


def read_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job directory under ``sweep_dir`` (one with a ``results.json`` or Hydra's ``.hydra/``)."""
    jobs = []
    for directory in sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir()), key=_job_sort_key):
        results_path, overrides_path = directory / RESULTS_FILE, directory / ".hydra" / "overrides.yaml"
        if results_path.is_file():
            results = json.loads(results_path.read_text())
            jobs.append(Job(directory.name, list(results.get("overrides", [])), results,
                            results.get("status", "failed: no status in results.json")))
        elif overrides_path.is_file():  # a job that died before writing its results
            jobs.append(Job(directory.name, list(OmegaConf.load(overrides_path)), {},
                            f"failed: no {RESULTS_FILE} (the job ended with an exception)"))
    return jobs


def identical_models(jobs: list[Job]) -> dict[str, str]:
    """``{job: first job}`` for jobs that train the same model as an earlier job of the sweep.

    Different densities can round to the same blocks per group (``max(1, round(density *
    C_in / PI))``); with every other override equal, such jobs repeat each other.
    """
    first: dict[tuple, str] = {}
    same_as = {}
    for job in jobs:
        blocks = job.blocks_per_group()
        if blocks is None:
            continue
        others = tuple(sorted(o for o in job.overrides if not override_key(o).startswith(DENSITY_KEYS)))
        key = (others, blocks)
        if key in first:
            same_as[job.number] = first[key]
        else:
            first[key] = job.number
    return same_as


# ---------------------------------------------------------------------------- groups and BD-rates

@dataclass
class BDResult:
    """A BD-rate (percent) and BD-PSNR (dB) between two curves; a missing one has its reason."""

    rate: float | None = None
    psnr: float | None = None
    rate_note: str = ""
    psnr_note: str = ""

    @classmethod
    def between(cls, anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> "BDResult":
        deltas = bd_deltas(anchor, test)
        return cls(deltas["bd_rate"], deltas["bd_psnr"], deltas.get("bd_rate_error", ""),
                   deltas.get("bd_psnr_error", ""))

    @classmethod
    def missing(cls, reason: str) -> "BDResult":
        return cls(rate_note=reason, psnr_note=reason)

    @property
    def note(self) -> str:
        notes = dict.fromkeys(note for note in (self.rate_note, self.psnr_note) if note)  # once if equal
        return "; ".join(notes)

    def cells(self) -> tuple[str, str]:
        rate = f"n/a: {self.rate_note}" if self.rate is None else f"{self.rate:+.2f} %"
        psnr = f"n/a: {self.psnr_note}" if self.psnr is None else f"{self.psnr:+.3f} dB"
        return rate, psnr


@dataclass
class Group:
    """The finished jobs that share every override but the RD trade-off: one RD curve per stage."""

    label: str
    jobs: list[Job]
    stage5_vs_stage1: BDResult = field(default_factory=BDResult)
    vs_reference: BDResult = field(default_factory=BDResult)

    def curve(self, stage: str) -> list[tuple[float, float]]:
        """(bpp, PSNR) at the end of ``stage``, one point per job that finished it, by rate."""
        return sorted(point for job in self.jobs if (point := job.stage_point(stage)) is not None)

    def _macs(self, key: str) -> float | None:
        values = [job.results["context_macs_per_pixel"][key] for job in self.jobs
                  if job.results.get("context_macs_per_pixel")]
        return sum(values) / len(values) if values else None

    @property
    def sparse_macs(self) -> float | None:
        return self._macs("sparse")

    @property
    def density(self) -> float | None:
        return self._macs("density")


def group_jobs(jobs: list[Job], reference: str | None = None) -> tuple[list[Group], Group | None]:
    """Groups of the finished jobs with their BD-rates, and the reference group.

    A group's label is the overrides by which it differs from the others ("all jobs" if none
    do). The reference is the group labelled ``reference``, by default the densest one.
    """
    finished = [job for job in jobs if job.finished]
    by_curve: dict[tuple[str, ...], list[Job]] = defaultdict(list)
    for job in finished:
        by_curve[job.curve_overrides].append(job)
    shared = set.intersection(*(set(key) for key in by_curve)) if by_curve else set()
    groups = [Group(" ".join(o for o in key if o not in shared) or "all jobs", members)
              for key, members in by_curve.items()]
    if not groups:
        return [], None
    labels = [group.label for group in groups]
    anchor = next((group for group in groups if group.label == reference), None)
    if reference is not None and anchor is None:
        log.error("hydra.callbacks.sweep_summary.reference=%r: no such group (groups: %s); using the densest",
                  reference, labels)
    if anchor is None:
        anchor = max(groups, key=lambda group: group.density or 0.0)
    for group in groups:
        first = group.curve(FIRST_STAGE)
        group.stage5_vs_stage1 = (BDResult.between(first, group.curve(LAST_STAGE)) if first
                                  else BDResult.missing("no stage-1 points (the jobs started at a later stage)"))
        group.vs_reference = (BDResult(0.0, 0.0) if group is anchor
                              else BDResult.between(anchor.curve(LAST_STAGE), group.curve(LAST_STAGE)))
    return groups, anchor


# ---------------------------------------------------------------------------- tables

COLUMNS = ("job", "overrides", "status", "stage", "test_bpp", "test_psnr", "test_ms_ssim", "val_bpp", "val_psnr",
           "ctx_sparse_macs_per_px", "ctx_dense_macs_per_px", "ctx_density")
STAGE_COLUMNS = tuple(f"{stage}_{metric}" for stage in STAGES for metric in ("bpp", "psnr"))
JOB_COLUMNS = (*COLUMNS, "group", "rd_point", "same_model_as", *STAGE_COLUMNS)
GROUP_COLUMNS = ("group", "jobs", "rd_points", "ctx_sparse_macs_per_px", "ctx_density",
                 "bd_rate_stage5_vs_stage1", "bd_psnr_stage5_vs_stage1", "bd_rate_vs_reference",
                 "bd_psnr_vs_reference", "note")


def job_rows(jobs: list[Job], groups: list[Group], same_as: dict[str, str]) -> list[dict[str, Any]]:
    group_of = {job.number: group.label for group in groups for job in group.jobs}
    rows = []
    for job in jobs:
        results = job.results
        test, val = results.get("test") or {}, results.get("val") or {}
        macs = results.get("context_macs_per_pixel") or {}
        row = {
            "job": job.number, "overrides": " ".join(job.overrides), "status": job.status,
            "stage": results.get("stage"),
            "test_bpp": test.get("bpp"), "test_psnr": test.get("psnr"), "test_ms_ssim": test.get("ms_ssim"),
            "val_bpp": val.get("bpp"), "val_psnr": val.get("psnr"),
            "ctx_sparse_macs_per_px": macs.get("sparse"), "ctx_dense_macs_per_px": macs.get("dense"),
            "ctx_density": macs.get("density"),
            "group": group_of.get(job.number), "rd_point": " ".join(job.rd_overrides) or None,
            "same_model_as": same_as.get(job.number),
        }
        for stage in STAGES:
            point = job.stage_point(stage) or (None, None)
            row[f"{stage}_bpp"], row[f"{stage}_psnr"] = point
        rows.append(row)
    return rows


def group_rows(groups: list[Group]) -> list[dict[str, Any]]:
    return [{
        "group": group.label, "jobs": " ".join(job.number for job in group.jobs),
        "rd_points": len(group.curve(LAST_STAGE)), "ctx_sparse_macs_per_px": group.sparse_macs,
        "ctx_density": group.density,
        "bd_rate_stage5_vs_stage1": group.stage5_vs_stage1.rate,
        "bd_psnr_stage5_vs_stage1": group.stage5_vs_stage1.psnr,
        "bd_rate_vs_reference": group.vs_reference.rate, "bd_psnr_vs_reference": group.vs_reference.psnr,
        "note": "; ".join(n for n in (group.stage5_vs_stage1.note, group.vs_reference.note) if n) or None,
    } for group in groups]


def summary_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job directory under ``sweep_dir`` (the jobs table of the summary)."""
    jobs = read_jobs(sweep_dir)
    groups, _ = group_jobs(jobs)
    return job_rows(jobs, groups, identical_models(jobs))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[column]) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _jobs_markdown(rows: list[dict[str, Any]]) -> str:
    columns = (*COLUMNS, "same_model_as")
    marked = [{**row, "status": row["status"] if row["status"] == FINISHED else f"**FAILED** ({row['status']})"}
              for row in rows]
    return markdown_table(marked, columns)


def _points_markdown(groups: list[Group]) -> str:
    header = ["group", "rd point", "job", *(f"{n} {stage} (bpp / dB)" for n, stage in enumerate(STAGES, 1))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        for job in sorted(group.jobs, key=lambda job: job.stage_point(LAST_STAGE) or (0.0, 0.0)):
            cells = []
            for stage in STAGES:
                point = job.stage_point(stage)
                cells.append("-" if point is None else f"{point[0]:.4f} / {point[1]:.2f}")
            lines.append(f"| {group.label} | {' '.join(job.rd_overrides) or '-'} | {job.number} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _groups_markdown(groups: list[Group], anchor: Group) -> str:
    header = ["group", "jobs", "RD points", "ctx sparse MACs/px", "ctx density", "BD-rate stage 5 vs 1",
              "BD-PSNR stage 5 vs 1", "BD-rate vs reference", "BD-PSNR vs reference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        reference = ("reference", "reference") if group is anchor else group.vs_reference.cells()
        lines.append("| " + " | ".join([
            group.label, " ".join(job.number for job in group.jobs), str(len(group.curve(LAST_STAGE))),
            _cell(group.sparse_macs), _cell(group.density), *group.stage5_vs_stage1.cells(), *reference]) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(jobs: list[Job], rows: list[dict[str, Any]], groups: list[Group], anchor: Group | None,
                     same_as: dict[str, str]) -> str:
    parts = ["# Sweep summary\n", "## Jobs\n", _jobs_markdown(rows)]
    failed = [job for job in jobs if not job.finished]
    if failed:
        parts.append(f"**{len(failed)} job(s) did not finish** and are left out of the RD curves: "
                     + ", ".join(f"job {job.number} ({job.status})" for job in failed) + ".\n")
    for job, first in same_as.items():
        blocks = dict(next(j for j in jobs if j.number == job).blocks_per_group())
        parts.append(f"**Same model:** job {job} repeats job {first} (blocks per group "
                     + ", ".join(f"{name} {count}" for name, count in blocks.items())
                     + ", all other overrides equal).\n")
    if anchor is not None:
        parts += [
            "## RD points (validation set, end of each stage)\n", _points_markdown(groups),
            "## BD-rates by group\n",
            f"Reference group: `{anchor.label}`. BD-rates are Bjøntegaard deltas (pchip, percent of rate at equal "
            f"PSNR; negative saves bits) of the stage-5 curve, against the same jobs' stage-1 curve and against the "
            f"reference group's stage-5 curve; a curve needs {MIN_POINTS} RD points.\n",
            _groups_markdown(groups, anchor),
        ]
        short = [group.label for group in groups if len(group.curve(LAST_STAGE)) < MIN_POINTS]
        if short:
            parts.append(f"Groups with fewer than {MIN_POINTS} RD points have points but no BD-rate: "
                         + ", ".join(f"`{label}`" for label in short) + ".\n")
        parts.append(f"![RD curves]({RD_PLOT})\n\n![BD-rate against MACs]({BD_MACS_PLOT})\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------- plots

def plot_rd_curves(groups: list[Group], path: Path) -> None:
    """One colour per group: the stage-5 curve solid, the stage-1 curve of the same jobs dashed."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, safe in any process

    figure = Figure(figsize=(7, 5))
    axis = figure.subplots()
    for index, group in enumerate(groups):
        color = f"C{index % 10}"
        for stage, style in ((LAST_STAGE, "-"), (FIRST_STAGE, "--")):
            points = group.curve(stage)
            if points:
                axis.plot(*zip(*points), style, marker="o", color=color,
                          label=f"{group.label} (stage {STAGES.index(stage) + 1})")
    axis.set_xlabel("bits per pixel (validation set)")
    axis.set_ylabel("PSNR [dB]")
    axis.set_title("RD curves per group: stage 5 solid, stage 1 dashed")
    axis.grid(True, alpha=0.4)
    if axis.lines:
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_bd_rate_against_macs(groups: list[Group], anchor: Group, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5))
    axis = figure.subplots()
    for group in groups:
        if group.vs_reference.rate is not None and group.sparse_macs is not None:
            axis.plot(group.sparse_macs, group.vs_reference.rate, "o", color="C0")
            axis.annotate(group.label, (group.sparse_macs, group.vs_reference.rate), fontsize="small",
                          textcoords="offset points", xytext=(4, 4))
    if not axis.lines:
        axis.text(0.5, 0.5, f"no BD-rate: groups need {MIN_POINTS} RD points", ha="center",
                  transform=axis.transAxes)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xlabel("context layers: sparse MACs per pixel")
    axis.set_ylabel(f"BD-rate vs {anchor.label} [%]")
    axis.set_title("rate cost of sparsity (stage 5)")
    axis.grid(True, alpha=0.4)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# ---------------------------------------------------------------------------- summary

@dataclass
class SweepResult:
    jobs: list[Job]
    groups: list[Group]
    reference: Group | None
    rows: list[dict[str, Any]]

    @property
    def failed(self) -> list[Job]:
        return [job for job in self.jobs if not job.finished]


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_summary(sweep_dir: str | Path, stem: str = SUMMARY_STEM, reference: str | None = None) -> SweepResult:
    """Write ``<stem>.csv``, ``<stem>_groups.csv``, ``<stem>.md`` and the two plots into ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir)
    groups, anchor = group_jobs(jobs, reference)
    same_as = identical_models(jobs)
    rows = job_rows(jobs, groups, same_as)
    _write_csv(sweep_dir / f"{stem}.csv", JOB_COLUMNS, rows)
    _write_csv(sweep_dir / f"{stem}_groups.csv", GROUP_COLUMNS, group_rows(groups))
    (sweep_dir / f"{stem}.md").write_text(summary_markdown(jobs, rows, groups, anchor, same_as))
    if anchor is not None:
        plot_rd_curves(groups, sweep_dir / RD_PLOT)
        plot_bd_rate_against_macs(groups, anchor, sweep_dir / BD_MACS_PLOT)
    return SweepResult(jobs, groups, anchor, rows)


class SweepSummary(Callback):
    """Hydra callback: the multirun summary, written when all jobs have returned.

    Args:
        stem: file name stem of the tables.
        reference: label of the group the others' BD-rates are measured against (as in the
            groups table, e.g. ``sparsity.density=1.0``); ``None``: the densest group.
    """

    def __init__(self, stem: str = SUMMARY_STEM, reference: str | None = None) -> None:
        self.stem = stem
        self.reference = reference

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = write_summary(sweep_dir, self.stem, self.reference)
        if not summary.jobs:
            log.warning("multirun summary: no %s found under %s", RESULTS_FILE, sweep_dir)
            return
        log.info("multirun summary (%d jobs) written to %s:\n%s", len(summary.jobs), sweep_dir / f"{self.stem}.md",
                 (sweep_dir / f"{self.stem}.md").read_text())
        if summary.failed:
            log.error("%d of %d multirun jobs did not finish: %s", len(summary.failed), len(summary.jobs),
                      "; ".join(f"job {job.number} [{' '.join(job.overrides)}]: {job.status}"
                                for job in summary.failed))
            raise SystemExit(1)
