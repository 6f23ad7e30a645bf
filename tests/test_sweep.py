"""The multirun summary: RD curves per group, BD-rates, failed and repeated jobs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from _training import TINY, run_script, schedule
from streamlic.sweep import BD_MACS_PLOT, RD_PLOT, write_summary

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
    assert short["bd_rate_vs_reference"] == ""
    assert "test curve: 2 RD points; a Bjøntegaard delta needs at least 4" in short["note"]

    markdown = (sweep / "summary.md").read_text()
    assert "| sparsity.density=0.5 | 4 5 6 7 | 4 | 50.0000 | 0.4167 | +5.00 % | " in markdown
    assert "+10.00 %" in markdown and "Reference group: `sparsity.density=1.0`" in markdown
    assert "Groups with fewer than 4 RD points have points but no BD-rate: `sparsity.density=0.25`" in markdown
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
