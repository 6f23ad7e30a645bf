"""The multirun summary: tables and plots of the groups, curves and BD-rates of :mod:`streamlic.sweep`.

At the end of a multirun, :class:`SweepSummary` (a Hydra callback registered under
``hydra.callbacks`` in ``conf/config.yaml``) reads every job's ``results.json`` and writes
into the sweep directory:

- ``summary.csv`` and the jobs table of ``summary.md``: one row per job with its overrides,
  status, group, seed, rate, quality, the multiply-accumulates of the block-sparse context
  layers and the validation RD point at the end of every stage (from the job's stage report);
- the RD points of ``summary.md``: per group and λ, each stage's point, as mean ± standard
  deviation over the seeds when ``seed`` is swept;
- ``summary_groups.csv`` and the groups tables of ``summary.md``: per group how many curves
  (one per seed) pass the check of :func:`streamlic.rd.curve_problem` at stage 1 and 5 and why
  the others fail, then the BD-rate of stage 5 against stage 1 of the same jobs (what
  hardware readiness costs) and of the group's stage-5 curve against a reference group's (by
  default the densest), per seed then mean ± std, marked when within the seed spread; a
  delta that cannot be taken is the text ``n/a: <reason>``;
- ``rd.png`` (one colour per group, stage 5 solid, stage 1 dashed) and ``bd_rate_macs.png``
  (BD-rate against the reference over sparse MACs per pixel).

Jobs whose status is not ``finished`` are marked in the tables, left out of the curves,
named in one ERROR line, and make the multirun exit with status 1. Jobs that train the same
model (equal blocks per group in every sparse layer, all other overrides equal) are flagged.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .rd import MIN_POINTS, MIN_RATE_SPAN
from .sweep import (FIRST_STAGE, LAST_STAGE, RESULTS_FILE, FINISHED, SPREAD_FACTOR, BDResult, Group, Job,
                    Spread, group_jobs, identical_models, read_jobs)
from .stage import STAGES

log = logging.getLogger(__name__)

SUMMARY_STEM = "summary"
RD_PLOT = "rd.png"
BD_MACS_PLOT = "bd_rate_macs.png"
COMPARISONS = ("stage5_vs_stage1", "vs_reference")

# ---------------------------------------------------------------------------- tables

COLUMNS = ("job", "overrides", "status", "stage", "test_bpp", "test_psnr", "test_ms_ssim", "val_bpp", "val_psnr",
           "ctx_sparse_macs_per_px", "ctx_dense_macs_per_px", "ctx_density")
STAGE_COLUMNS = tuple(f"{stage}_{metric}" for stage in STAGES for metric in ("bpp", "psnr"))
JOB_COLUMNS = (*COLUMNS, "group", "rd_point", "seed", "same_model_as", *STAGE_COLUMNS)
GROUP_COLUMNS = ("group", "jobs", "seeds", "rd_points", "usable_stage1_curves", "usable_stage5_curves",
                 "curve_problems", "ctx_sparse_macs_per_px", "ctx_density",
                 *(f"{key}_{comparison}{suffix}" for comparison in COMPARISONS for key in ("bd_rate", "bd_psnr")
                   for suffix in ("", "_std")),
                 *(f"bd_rate_{comparison}_{suffix}" for comparison in COMPARISONS
                   for suffix in ("per_seed", "within_seed_spread")))


def _seed_label(seed: str | None) -> str:
    return "-" if seed is None else f"seed={seed}"


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
            "group": group_of.get(job.number), "rd_point": " ".join(job.rd_overrides) or None, "seed": job.seed,
            "same_model_as": same_as.get(job.number),
        }
        for stage in STAGES:
            point = job.stage_point(stage) or (None, None)
            row[f"{stage}_bpp"], row[f"{stage}_psnr"] = point
        rows.append(row)
    return rows


def curve_problems_text(group: Group) -> str | None:
    """The failed curves of a group with their reasons, e.g. ``stage 1 seed=0: PSNR not increasing with rate``."""
    problems = [f"stage {STAGES.index(stage) + 1}{'' if seed is None else f' seed={seed}'}: {problem}"
                for stage in (FIRST_STAGE, LAST_STAGE) for seed, problem in group.curve_problems(stage).items()
                if problem]
    return "; ".join(problems) or None


def group_rows(groups: list[Group]) -> list[dict[str, Any]]:
    rows = []
    for group in groups:
        row = {"group": group.label, "jobs": " ".join(job.number for job in group.jobs),
               "seeds": " ".join(_seed_label(seed) for seed in group.seeds),
               "rd_points": len(group.replicates()),
               **{f"usable_{stage}_curves": f"{group.usable(name)} of {len(group.seeds)}"
                  for stage, name in (("stage1", FIRST_STAGE), ("stage5", LAST_STAGE))},
               "curve_problems": curve_problems_text(group),
               "ctx_sparse_macs_per_px": group.sparse_macs, "ctx_density": group.density}
        for comparison in COMPARISONS:
            result: BDResult = getattr(group, comparison)
            for key in ("bd_rate", "bd_psnr"):
                spread = result.spread(key)
                row[f"{key}_{comparison}"] = result.value(key)
                row[f"{key}_{comparison}_std"] = None if spread is None else spread.std
            row[f"bd_rate_{comparison}_per_seed"] = " ".join(
                f"{_seed_label(seed)}:{deltas['bd_rate']:+.4f}" if isinstance(deltas["bd_rate"], float)
                else f"{_seed_label(seed)}:{deltas['bd_rate']}" for seed, deltas in result.per_seed.items())
            spread = result.spread("bd_rate")
            row[f"bd_rate_{comparison}_within_seed_spread"] = None if spread is None else spread.within_spread
        rows.append(row)
    return rows


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


def _spread_text(spread: Spread, decimals: int) -> str:
    if spread.std is None:
        return f"{spread.mean:.{decimals}f}"
    return f"{spread.mean:.{decimals}f} ± {spread.std:.{decimals}f}"


def _points_markdown(groups: list[Group]) -> str:
    header = ["group", "rd point", "jobs", *(f"{n} {stage} (bpp / dB)" for n, stage in enumerate(STAGES, 1))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        stages = {stage: {label: (bpp, psnr) for label, _, bpp, psnr in group.point_spread(stage)} for stage in STAGES}
        for label, jobs in group.replicates().items():
            cells = []
            for stage in STAGES:
                point = stages[stage].get(label)
                cells.append("-" if point is None else f"{_spread_text(point[0], 4)} / {_spread_text(point[1], 2)}")
            lines.append(f"| {group.label} | {label} | {' '.join(job.number for job in jobs)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bd_cell(result: BDResult, key: str) -> str:
    """A BD-rate (``%``) or BD-PSNR (``dB``) cell: the value, mean ± std over seeds, or ``n/a: <reason>``."""
    spread = result.spread(key)
    if spread is None:
        return result.reason(key)
    unit, decimals = (" %", 2) if key == "bd_rate" else (" dB", 3)
    mean = f"{spread.mean:+.{decimals}f}"
    text = (mean if spread.std is None else f"{mean} ± {spread.std:.{decimals}f}") + unit
    if len(result.per_seed) > 1:
        text += f" ({spread.count} of {len(result.per_seed)} seeds)"
    if spread.within_spread:
        text += ", within seed spread"
    return text


def _groups_markdown(groups: list[Group], anchor: Group) -> str:
    header = ["group", "jobs", "usable curves stage 1 / 5", "ctx sparse MACs/px", "ctx density",
              "BD-rate stage 5 vs 1", "BD-PSNR stage 5 vs 1", "BD-rate vs reference", "BD-PSNR vs reference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        reference = (["reference", "reference"] if group is anchor
                     else [bd_cell(group.vs_reference, key) for key in ("bd_rate", "bd_psnr")])
        usable = f"{group.usable(FIRST_STAGE)} of {len(group.seeds)} / {group.usable(LAST_STAGE)} of {len(group.seeds)}"
        lines.append("| " + " | ".join([
            group.label, " ".join(job.number for job in group.jobs), usable, _cell(group.sparse_macs),
            _cell(group.density), *(bd_cell(group.stage5_vs_stage1, key) for key in ("bd_rate", "bd_psnr")),
            *reference]) + " |")
    return "\n".join(lines) + "\n"


def _checks_markdown(groups: list[Group]) -> str:
    lines = ["| group | stage | curve | check |", "|---|---|---|---|"]
    for group in groups:
        for stage in (FIRST_STAGE, LAST_STAGE):
            for seed, problem in group.curve_problems(stage).items():
                lines.append(f"| {group.label} | {STAGES.index(stage) + 1} {stage} | {_seed_label(seed)} | "
                             f"{'usable' if problem is None else f'n/a: {problem}'} |")
    return "\n".join(lines) + "\n"


def _spread_markdown(groups: list[Group]) -> str:
    seeds = max((len(group.seeds) for group in groups), default=0)
    if seeds < 2:
        return "Seeds: 1 replicate: no spread (sweep `seed=0,1,...` to see it).\n"
    return (f"Seeds: up to {seeds} replicates per RD point (jobs that differ only in `seed`). Points are mean ± "
            f"sample standard deviation over seeds; each BD-rate is taken per seed (against the reference's curve "
            f"of the same seed), then mean ± standard deviation. A mean within {SPREAD_FACTOR:g} standard "
            f"deviations of zero is marked *within seed spread*: the difference is not told apart from the "
            f"seed-to-seed variation (a rough rule, not a significance test; a few seeds give a test no power).\n")


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
            "## RD points (validation set, end of each stage)\n", _points_markdown(groups), _spread_markdown(groups),
            "## Curve checks\n",
            f"A curve (one group, one stage, one seed) gives a BD-rate only if it has at least {MIN_POINTS} RD "
            f"points, its rate rises strictly with λ, its PSNR rises strictly with rate and its largest rate is at "
            f"least {MIN_RATE_SPAN:g}x its smallest (the monotonic four-point curves the VCEG/JVET common test "
            f"conditions assume); otherwise it is flagged with the reason and gets no BD-rate.\n",
            _checks_markdown(groups),
            "## BD-rates by group\n",
            f"Reference group: `{anchor.label}`. BD-rates are Bjøntegaard deltas (pchip, percent of rate at equal "
            f"PSNR; negative saves bits) of the stage-5 curve, against the same jobs' stage-1 curve and against the "
            f"reference group's stage-5 curve; `n/a` says why one is missing.\n",
            _groups_markdown(groups, anchor),
            f"![RD curves]({RD_PLOT})\n\n![BD-rate against MACs]({BD_MACS_PLOT})\n",
        ]
    return "\n".join(parts)


# ---------------------------------------------------------------------------- plots

def plot_rd_curves(groups: list[Group], path: Path) -> None:
    """One colour per group: the stage-5 curve solid, the stage-1 curve of the same jobs dashed.

    Points are means over seeds with ± one standard deviation as error bars; a curve with a
    flagged seed is named "(flagged)" in the legend.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, safe in any process

    figure = Figure(figsize=(7, 5))
    axis = figure.subplots()
    for index, group in enumerate(groups):
        color = f"C{index % 10}"
        for stage, style in ((LAST_STAGE, "-"), (FIRST_STAGE, "--")):
            spreads = sorted(((bpp, psnr) for _, _, bpp, psnr in group.point_spread(stage)),
                             key=lambda pair: pair[0].mean)
            if spreads:
                flagged = " (flagged)" if group.usable(stage) < len(group.seeds) else ""
                axis.errorbar([b.mean for b, _ in spreads], [p.mean for _, p in spreads],
                              xerr=[b.std or 0.0 for b, _ in spreads], yerr=[p.std or 0.0 for _, p in spreads],
                              fmt=style, marker="o", color=color, capsize=2,
                              label=f"{group.label} (stage {STAGES.index(stage) + 1}){flagged}")
    axis.set_xlabel("bits per pixel (validation set)")
    axis.set_ylabel("PSNR [dB]")
    axis.set_title("RD curves per group: stage 5 solid, stage 1 dashed")
    axis.grid(True, alpha=0.4)
    if axis.lines or axis.containers:
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_bd_rate_against_macs(groups: list[Group], anchor: Group, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5))
    axis = figure.subplots()
    drawn = False
    for group in groups:
        spread = group.vs_reference.spread("bd_rate")
        if spread is not None and group.sparse_macs is not None:
            axis.errorbar(group.sparse_macs, spread.mean, yerr=spread.std or 0.0, fmt="o", color="C0", capsize=3)
            axis.annotate(group.label, (group.sparse_macs, spread.mean), fontsize="small",
                          textcoords="offset points", xytext=(4, 4))
            drawn = True
    if not drawn:
        axis.text(0.5, 0.5, "no BD-rate: no usable pair of curves (see summary.md)", ha="center",
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
