"""The multirun summary: RD curves per group, curve checks, seed replicates, BD-rates, failed and repeated jobs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from _training import TINY, run_script, schedule
from streamlic.sweep_report import BD_MACS_PLOT, RD_PLOT, write_summary

DENSE_BPP = [0.20, 0.35, 0.60, 1.00]
DENSE_PSNR = [24.0, 26.0, 28.0, 30.0]
LAMBDAS = [0.0018, 0.0067, 0.025, 0.0932]
# blocks per group (ctx1, ctx2, ep) of the tiny model at each density
BLOCKS = {"1.0": (2, 4, 4), "0.5": (1, 2, 2), "0.25": (1, 1, 1), "0.2": (1, 1, 1)}


def _write_job(sweep: Path, number: int, overrides: list[str], density: str, stage1: tuple[float, float],
               stage5: tuple[float, float], status: str = "finished") -> None:
    blocks = dict(zip(("ctx1", "ctx2", "ep"), BLOCKS[density]))
    layers = {name: {"blocks_per_group": count, "sparse": 10.0 * count, "dense": 40.0}
              for name, count in blocks.items()}
    sparse = sum(entry["sparse"] for entry in layers.values())
    results = {
        "overrides": ["model=tiny", *overrides], "status": status, "stage": "pdf",
        "stage_report": [{"stage": "aun", "end": {"bpp": stage1[0], "psnr": stage1[1]}},
                         {"stage": "mask", "end": {"bpp": stage1[0], "psnr": stage1[1] - 0.5}},
                         {"stage": "pdf", "end": {"bpp": stage5[0], "psnr": stage5[1]}}],
        "val": {"bpp": stage5[0], "psnr": stage5[1]},
        "context_macs_per_pixel": {"sparse": sparse, "dense": 120.0, "density": sparse / 120.0, "layers": layers},
    }
    (sweep / str(number)).mkdir(parents=True)
    (sweep / str(number) / "results.json").write_text(json.dumps(results))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Results of a lambda x density sweep whose BD-rates are known.

    Stage 5 needs 5 % more rate than stage 1 at every quality in every group; density 0.5 needs
    10 % more than density 1.0 at stage 5; density 0.25 has two lambdas; density 0.2 repeats
    0.25 (same blocks per group); one job failed at export.
    """
    number = 0
    for density, factor, lambdas in (("1.0", 1.0, LAMBDAS), ("0.5", 1.1, LAMBDAS), ("0.25", 1.3, LAMBDAS[:2]),
                                     ("0.2", 1.3, LAMBDAS[:1])):
        for lmbda, bpp, psnr in zip(lambdas, DENSE_BPP, DENSE_PSNR):
            stage5 = (bpp * factor, psnr)
            _write_job(tmp_path, number, [f"module.lmbda={lmbda}", f"sparsity.density={density}"], density,
                       stage1=(stage5[0] / 1.05, psnr), stage5=stage5)
            number += 1
    _write_job(tmp_path, number, ["module.lmbda=0.18", "sparsity.density=1.0"], "1.0", (2.0, 32.0), (2.1, 32.0),
               status="failed: export (bias beyond 16 bits in ep)")
    return tmp_path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_groups_get_bd_rates_of_stage5_against_stage1_and_the_densest_group(sweep):
    summary = write_summary(sweep)
    groups = {row["group"]: row for row in _read_csv(sweep / "summary_groups.csv")}
    assert list(groups) == ["sparsity.density=1.0", "sparsity.density=0.5", "sparsity.density=0.25",
                            "sparsity.density=0.2"]
    assert summary.reference.label == "sparsity.density=1.0"  # the densest by default
    dense, half = groups["sparsity.density=1.0"], groups["sparsity.density=0.5"]
    for group in (dense, half):
        assert float(group["bd_rate_stage5_vs_stage1"]) == pytest.approx(5.0, abs=1e-9)
        assert group["rd_points"] == "4"
    assert float(dense["bd_rate_vs_reference"]) == 0.0
    assert float(half["bd_rate_vs_reference"]) == pytest.approx(10.0, abs=1e-9)
    assert float(half["bd_psnr_vs_reference"]) < 0  # at equal rate the sparser group is worse
    assert float(half["ctx_sparse_macs_per_px"]) == 50.0 and float(dense["ctx_sparse_macs_per_px"]) == 100.0
    short = groups["sparsity.density=0.25"]
    assert short["bd_rate_vs_reference"] == "n/a: test curve: 2 RD points (BD-rate needs 4)"
    assert short["usable_stage5_curves"] == "0 of 1" and dense["usable_stage5_curves"] == "1 of 1"
    assert short["curve_problems"] == "stage 1: 2 RD points (BD-rate needs 4); stage 5: 2 RD points (BD-rate needs 4)"

    markdown = (sweep / "summary.md").read_text()
    assert "| sparsity.density=0.5 | 4 5 6 7 | 1 of 1 / 1 of 1 | 50.0000 | 0.4167 | +5.00 % | " in markdown
    assert "+10.00 %" in markdown and "Reference group: `sparsity.density=1.0`" in markdown
    assert "| sparsity.density=0.25 | 5 pdf | - | n/a: 2 RD points (BD-rate needs 4) |" in markdown
    assert "| n/a: test curve: 2 RD points (BD-rate needs 4) |" in markdown
    assert "1 replicate: no spread" in markdown
    # RD points of every stage: stage 1, 2 and 5 of job 4 (lambda 0.0018 at density 0.5)
    assert "| sparsity.density=0.5 | module.lmbda=0.0018 | 4 | 0.2095 / 24.00 | 0.2095 / 23.50 | - | - | " \
           "0.2200 / 24.00 |" in markdown
    for plot in (RD_PLOT, BD_MACS_PLOT):
        assert (sweep / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_another_reference_group(sweep):
    write_summary(sweep, reference="sparsity.density=0.5")
    groups = {row["group"]: row for row in _read_csv(sweep / "summary_groups.csv")}
    assert float(groups["sparsity.density=1.0"]["bd_rate_vs_reference"]) == pytest.approx(100 / 1.1 - 100)


def test_failed_and_repeated_jobs_are_marked(sweep):
    summary = write_summary(sweep)
    assert [job.number for job in summary.failed] == ["11"]
    rows = {row["job"]: row for row in _read_csv(sweep / "summary.csv")}
    assert rows["11"]["status"].startswith("failed: export") and rows["11"]["group"] == ""
    assert rows["10"]["same_model_as"] == "8"  # density 0.2 cuts the blocks of density 0.25
    assert rows["9"]["same_model_as"] == ""  # another lambda: another model
    markdown = (sweep / "summary.md").read_text()
    assert "**FAILED** (failed: export (bias beyond 16 bits in ep))" in markdown
    assert "**Same model:** job 10 repeats job 8 (blocks per group ctx1 1, ctx2 1, ep 1" in markdown
    # the failed job's point is not on the dense curve
    assert "2.1000" not in (sweep / "summary_groups.csv").read_text()


def _write_curve(sweep: Path, start: int, overrides: list[str], stage1: list[tuple[float, float]],
                 stage5: list[tuple[float, float]], density: str = "1.0") -> int:
    """One job per λ of LAMBDAS with the given stage-1 and stage-5 points; returns the next job number."""
    for number, (lmbda, first, last) in enumerate(zip(LAMBDAS, stage1, stage5), start):
        _write_job(sweep, number, [f"module.lmbda={lmbda}", *overrides], density, stage1=first, stage5=last)
    return start + len(LAMBDAS)


GOOD = list(zip(DENSE_BPP, DENSE_PSNR))


@pytest.mark.parametrize("stage1, reason", [
    ([(0.20, 24.0), (0.35, 26.0), (0.60, 25.5), (1.00, 30.0)], "PSNR not increasing with rate"),
    ([(0.20, 24.0), (0.60, 28.0), (0.35, 26.0), (1.00, 30.0)], "rate not increasing with λ"),
    ([(0.20, 24.0), (0.25, 26.0), (0.30, 28.0), (0.35, 30.0)], "rate span 1.75x (BD-rate needs 2x)"),
])
def test_a_flagged_curve_gets_its_reason_and_no_bd_rate(tmp_path, stage1, reason):
    number = _write_curve(tmp_path, 0, ["sparsity.density=1.0"], stage1, GOOD)
    _write_curve(tmp_path, number, ["sparsity.density=0.5"], GOOD, [(b * 1.1, q) for b, q in GOOD], density="0.5")
    write_summary(tmp_path)
    groups = {row["group"]: row for row in _read_csv(tmp_path / "summary_groups.csv")}
    dense, half = groups["sparsity.density=1.0"], groups["sparsity.density=0.5"]
    assert dense["usable_stage1_curves"] == "0 of 1" and dense["usable_stage5_curves"] == "1 of 1"
    assert dense["curve_problems"] == f"stage 1: {reason}"
    assert dense["bd_rate_stage5_vs_stage1"] == dense["bd_psnr_stage5_vs_stage1"] == f"n/a: anchor curve: {reason}"
    assert float(half["bd_rate_stage5_vs_stage1"]) == pytest.approx(10.0)  # the other group is unaffected
    assert float(half["bd_rate_vs_reference"]) == pytest.approx(10.0)
    markdown = (tmp_path / "summary.md").read_text()
    assert f"| sparsity.density=1.0 | 1 aun | - | n/a: {reason} |" in markdown
    assert f"| sparsity.density=1.0 | 0 1 2 3 | 0 of 1 / 1 of 1 | 100.0000 | 0.8333 | n/a: anchor curve: {reason} |" \
        in markdown


def test_curves_without_overlap_have_no_bd_rate(tmp_path):
    number = _write_curve(tmp_path, 0, ["sparsity.density=1.0"], GOOD, GOOD)
    _write_curve(tmp_path, number, ["sparsity.density=0.5"], GOOD, [(b, q - 10.0) for b, q in GOOD], density="0.5")
    write_summary(tmp_path)
    half = {row["group"]: row for row in _read_csv(tmp_path / "summary_groups.csv")}["sparsity.density=0.5"]
    assert half["usable_stage5_curves"] == "1 of 1"
    assert half["bd_rate_vs_reference"].startswith("n/a: no overlap in PSNR (anchor 24–30, test 14–20)")
    assert float(half["bd_psnr_vs_reference"]) == pytest.approx(-10.0)  # the rates overlap: BD-PSNR is defined


@pytest.fixture
def seeded_sweep(tmp_path: Path) -> Path:
    """λ x density x seed=0,1: density 0.5 needs 2 % more rate than 1.0 with seed 0 and 10 % with seed 1,
    density 0.25 30 % and 34 %. Seed 1's dense curve has 0.1 dB more than seed 0's at the same rates."""
    number = 0
    for seed, shift in (("0", 0.0), ("1", 0.1)):
        for density, factor in (("1.0", 1.0), ("0.5", (1.02, 1.10)[int(seed)]), ("0.25", (1.30, 1.34)[int(seed)])):
            points = [(b * factor, q + shift) for b, q in GOOD]
            number = _write_curve(tmp_path, number, [f"sparsity.density={density}", f"seed={seed}"],
                                  [(b / 1.05, q) for b, q in points], points, density=density)
    return tmp_path


def test_seed_replicates_give_mean_and_spread(seeded_sweep):
    summary = write_summary(seeded_sweep)
    assert [group.label for group in summary.groups] == ["sparsity.density=1.0", "sparsity.density=0.5",
                                                         "sparsity.density=0.25"]  # seed makes no group
    groups = {row["group"]: row for row in _read_csv(seeded_sweep / "summary_groups.csv")}
    half, quarter = groups["sparsity.density=0.5"], groups["sparsity.density=0.25"]
    assert half["seeds"] == "seed=0 seed=1" and half["usable_stage5_curves"] == "2 of 2"
    assert float(half["bd_rate_vs_reference"]) == pytest.approx(6.0)  # mean of +2 % and +10 %
    assert float(half["bd_rate_vs_reference_std"]) == pytest.approx(8.0 / 2**0.5)
    assert half["bd_rate_vs_reference_per_seed"] == "seed=0:+2.0000 seed=1:+10.0000"
    assert half["bd_rate_vs_reference_within_seed_spread"] == "True"  # 6 < 2 x 5.66
    assert float(quarter["bd_rate_vs_reference"]) == pytest.approx(32.0)
    assert quarter["bd_rate_vs_reference_within_seed_spread"] == "False"  # 32 > 2 x 2.83
    assert float(half["bd_rate_stage5_vs_stage1"]) == pytest.approx(5.0)
    assert float(half["bd_rate_stage5_vs_stage1_std"]) == pytest.approx(0.0, abs=1e-9)
    markdown = (seeded_sweep / "summary.md").read_text()
    assert "+6.00 ± 5.66 % (2 of 2 seeds), within seed spread" in markdown
    assert "+32.00 ± 2.83 % (2 of 2 seeds) |" in markdown
    assert "up to 2 replicates per RD point" in markdown
    # the dense point at λ 0.0018: jobs 0 (seed 0) and 12 (seed 1), PSNR 24.0 and 24.1
    assert "| sparsity.density=1.0 | module.lmbda=0.0018 | 0 12 | 0.1905 ± 0.0000 / 24.05 ± 0.07 |" in markdown


def test_a_flagged_seed_leaves_the_others_in_the_mean(seeded_sweep):
    results = seeded_sweep / "17" / "results.json"  # density 0.5, seed 1, λ 0.0018 -> below λ 0.0067's rate
    data = json.loads(results.read_text())
    data["stage_report"][-1]["end"]["psnr"] = 40.0
    results.write_text(json.dumps(data))
    write_summary(seeded_sweep)
    half = {row["group"]: row for row in _read_csv(seeded_sweep / "summary_groups.csv")}["sparsity.density=0.5"]
    assert half["usable_stage5_curves"] == "1 of 2"
    assert half["curve_problems"] == "stage 5 seed=1: PSNR not increasing with rate"
    assert float(half["bd_rate_vs_reference"]) == pytest.approx(2.0) and half["bd_rate_vs_reference_std"] == ""
    assert half["bd_rate_vs_reference_per_seed"] == ("seed=0:+2.0000 seed=1:n/a: test curve: PSNR not increasing "
                                                     "with rate")
    assert "+2.00 % (1 of 2 seeds)" in (seeded_sweep / "summary.md").read_text()


def test_hardware_groups_like_density_groups(tmp_path):
    number = _write_curve(tmp_path, 0, ["hardware=w12a12"], GOOD, GOOD)
    _write_curve(tmp_path, number, ["hardware=w8a8"], GOOD, [(b * 1.25, q) for b, q in GOOD])
    summary = write_summary(tmp_path)
    assert summary.reference.label == "hardware=w12a12"  # equal density: the first group
    groups = {row["group"]: row for row in _read_csv(tmp_path / "summary_groups.csv")}
    assert float(groups["hardware=w8a8"]["bd_rate_vs_reference"]) == pytest.approx(25.0)
    write_summary(tmp_path, reference="hardware=w8a8")
    groups = {row["group"]: row for row in _read_csv(tmp_path / "summary_groups.csv")}
    assert float(groups["hardware=w12a12"]["bd_rate_vs_reference"]) == pytest.approx(-20.0)
    assert (tmp_path / RD_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_multirun_with_a_stopped_job_writes_the_summary_and_exits_non_zero(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_script(["-m", *TINY, *schedule(), "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                       "test=false", "+callbacks.nan._target_=_training.NaNInjector",
                       "+callbacks.nan.at_step=1,100", f"hydra.sweep.dir={sweep}"], timeout=400)
    assert done.returncode == 1, done.stderr[-3000:]
    rows = {row["job"]: row for row in _read_csv(sweep / "summary.csv")}
    assert rows["0"]["status"] == "stopped: non-finite loss" and rows["1"]["status"] == "finished"
    output = done.stdout + done.stderr
    error = [line for line in output.splitlines() if "1 of 2 multirun jobs did not finish" in line]
    assert len(error) == 1 and "job 0 [" in error[0], output[-3000:]
    assert error[0].endswith("+callbacks.nan.at_step=1]: stopped: non-finite loss")
    assert "**FAILED** (stopped: non-finite loss)" in (sweep / "summary.md").read_text()
