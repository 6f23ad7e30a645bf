"""Per-job results of a training run and the RD curves of a multirun: groups, seed replicates, BD-rates.

Every ``train.py`` job writes ``results.json`` into its output directory. A multirun's jobs
fall into groups by every override except the RD trade-off (``module.lmbda``,
``module.quality``: the points along a curve) and ``seed`` (replicates of a point): a density
sweep gives one group per density, a hardware sweep one per bit width, both together one per
pair. Each group is one RD curve per stage and per seed. Every curve is checked before a
Bjøntegaard delta is taken (:func:`streamlic.rd.curve_problem`); a BD-rate is computed per
seed (the reference group's curve of the same seed as anchor) and reported as mean ± standard
deviation across seeds. :mod:`streamlic.sweep_report` writes the tables and plots.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from . import topology
from .rd import bd_deltas, curve_problem, not_available
from .stage import STAGES

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
FINISHED = "finished"
LAMBDA_KEYS = ("module.lmbda", "module.quality")  # the points along one RD curve
SEED_KEYS = ("seed",)  # replicates of one RD point
DENSITY_KEYS = ("sparsity.density", "sparsity.layers")  # overrides that only change blocks per group
FIRST_STAGE, LAST_STAGE = STAGES[0], STAGES[-1]
# a mean difference within this many standard deviations of its per-seed values is "within the seed spread"
SPREAD_FACTOR = 2.0


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


def _value(overrides: list[str], keys: tuple[str, ...]) -> str | None:
    return next((o.split("=", 1)[1] for o in overrides if "=" in o and override_key(o) in keys), None)


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
    def lmbda(self) -> float | None:
        """The swept λ (or CompressAI quality level, which orders the same way); ``None`` if not swept."""
        value = _value(self.overrides, LAMBDA_KEYS)
        try:
            return None if value is None else float(value)
        except ValueError:
            return None

    @property
    def seed(self) -> str | None:
        """The swept seed (``None``: the config's)."""
        return _value(self.overrides, SEED_KEYS)

    @property
    def curve_overrides(self) -> tuple[str, ...]:
        """Every override but λ and seed: jobs that share them lie on one RD curve (one per seed)."""
        return tuple(sorted(o for o in self.overrides if override_key(o) not in LAMBDA_KEYS + SEED_KEYS))

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


# ---------------------------------------------------------------------------- curves, replicates, BD-rates

@dataclass
class Spread:
    """Mean and sample standard deviation of replicate values (``std`` ``None`` for one value)."""

    mean: float
    std: float | None
    count: int

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))

    @property
    def within_spread(self) -> bool | None:
        """Whether the mean is within :data:`SPREAD_FACTOR` standard deviations of zero (``None``: one value)."""
        return None if self.std is None else abs(self.mean) <= SPREAD_FACTOR * self.std


@dataclass
class BDResult:
    """BD-rate (percent) and BD-PSNR (dB) of one comparison, per seed: a number or ``"n/a: <reason>"``."""

    per_seed: dict[str | None, dict[str, float | str]] = field(default_factory=dict)

    def spread(self, key: str) -> Spread | None:
        """Mean ± std of ``key`` (``bd_rate`` or ``bd_psnr``) over the seeds that have a number."""
        values = [deltas[key] for deltas in self.per_seed.values() if isinstance(deltas[key], float)]
        return Spread.of(values) if values else None

    def reason(self, key: str) -> str | None:
        """Why no seed has a number (the distinct reasons), or ``None``."""
        if self.spread(key) is not None:
            return None
        reasons = dict.fromkeys(str(deltas[key]) for deltas in self.per_seed.values())
        return "; ".join(reasons) or not_available("no curves")

    def value(self, key: str) -> float | str:
        """The mean over seeds, or the reason there is none (what the CSV holds)."""
        spread = self.spread(key)
        return spread.mean if spread is not None else self.reason(key)


def _seed_order(seed: str | None) -> tuple[int, float, str]:
    try:
        return (0, float(seed), "") if seed is not None else (0, -1.0, "")
    except ValueError:
        return (1, 0.0, seed)


@dataclass
class Group:
    """The finished jobs that share every override but λ and seed: one RD curve per stage and seed."""

    label: str
    jobs: list[Job]
    stage5_vs_stage1: BDResult = field(default_factory=BDResult)
    vs_reference: BDResult = field(default_factory=BDResult)

    @property
    def seeds(self) -> list[str | None]:
        return sorted({job.seed for job in self.jobs}, key=_seed_order)

    def replicates(self) -> dict[str, list[Job]]:
        """The jobs of each RD point (its λ override), in the order of λ; several for several seeds."""
        points: dict[str, list[Job]] = defaultdict(list)
        for job in sorted(self.jobs, key=lambda job: (job.lmbda is None, job.lmbda or 0.0, _seed_order(job.seed))):
            points[" ".join(job.rd_overrides) or "-"].append(job)
        return dict(points)

    def seed_curve(self, stage: str, seed: str | None) -> tuple[list[tuple[float, float]], list[float] | None]:
        """(bpp, PSNR) at the end of ``stage`` of the jobs of ``seed``, and their λ (``None`` if not all known)."""
        jobs = [job for job in self.jobs if job.seed == seed and job.stage_point(stage) is not None]
        lambdas = [job.lmbda for job in jobs]
        return [job.stage_point(stage) for job in jobs], (None if None in lambdas else lambdas)

    def curve_problems(self, stage: str) -> dict[str | None, str | None]:
        """Per seed: why its ``stage`` curve gives no BD-rate (``None``: usable)."""
        return {seed: curve_problem(*self.seed_curve(stage, seed)) for seed in self.seeds}

    def usable(self, stage: str) -> int:
        return sum(problem is None for problem in self.curve_problems(stage).values())

    def point_spread(self, stage: str) -> list[tuple[str, list[Job], Spread, Spread]]:
        """Per RD point that reached ``stage``: its label, jobs, and the spread of bpp and of PSNR over seeds."""
        rows = []
        for label, jobs in self.replicates().items():
            points = [point for job in jobs if (point := job.stage_point(stage)) is not None]
            if points:
                rows.append((label, jobs, Spread.of([p[0] for p in points]), Spread.of([p[1] for p in points])))
        return rows

    def curve(self, stage: str) -> list[tuple[float, float]]:
        """The mean (bpp, PSNR) over seeds of each RD point at the end of ``stage``, by rate (for plots)."""
        return sorted((bpp.mean, psnr.mean) for _, _, bpp, psnr in self.point_spread(stage))

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


def compare(anchor: Group, anchor_stage: str, test: Group, test_stage: str) -> BDResult:
    """BD-rate and BD-PSNR of ``test``'s ``test_stage`` curves against ``anchor``'s, seed by seed."""
    result = BDResult()
    anchor_seeds = set(anchor.seeds)
    for seed in test.seeds:
        if seed not in anchor_seeds:
            reason = not_available(f"no seed {seed} in {anchor.label}")
            result.per_seed[seed] = {"bd_rate": reason, "bd_psnr": reason}
            continue
        (anchor_points, anchor_lambdas), (test_points, test_lambdas) = (
            anchor.seed_curve(anchor_stage, seed), test.seed_curve(test_stage, seed))
        if not anchor_points:
            reason = not_available(f"no stage-{STAGES.index(anchor_stage) + 1} points (the jobs started later)")
            result.per_seed[seed] = {"bd_rate": reason, "bd_psnr": reason}
            continue
        result.per_seed[seed] = bd_deltas(anchor_points, test_points, anchor_lambdas, test_lambdas)
    return result


def group_jobs(jobs: list[Job], reference: str | None = None) -> tuple[list[Group], Group | None]:
    """Groups of the finished jobs with their BD-rates, and the reference group.

    A group's label is the overrides by which it differs from the others ("all jobs" if none
    do). The reference is the group labelled ``reference``, by default the densest one (the
    first of the densest when several are, e.g. in a hardware sweep).
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
    anchor = next((group for group in groups if group.label == reference), None)
    if reference is not None and anchor is None:
        log.error("hydra.callbacks.sweep_summary.reference=%r: no such group (groups: %s); using the densest",
                  reference, [group.label for group in groups])
    if anchor is None:
        anchor = max(groups, key=lambda group: group.density or 0.0)
    for group in groups:
        group.stage5_vs_stage1 = compare(group, FIRST_STAGE, group, LAST_STAGE)
        group.vs_reference = compare(anchor, LAST_STAGE, group, LAST_STAGE)
    return groups, anchor
