"""The README's bit-width study: which per-layer widths cost how much rate-distortion, before and after QAT training.

1. ``streamlic sensitivity CKPT`` (a stage-2 checkpoint): each layer's RD-loss change per width, the
   allocations per tolerance, their bit cost and their RD-loss change at QAT entry;
2. every allocation and the uniform ``w12a12`` and ``w8a8`` trained through stages 3-5 from that
   checkpoint (``init_from``; the allocations are options of the hardware group the sensitivity
   command writes), with each seed;
3. one table: bit cost, weight memory, the RD-loss change at QAT entry and at the end of stages
   3, 4 and 5 (the validation loss of each stage report against the float loss of the checkpoint,
   mean ± standard deviation over the seeds), the test rate and PSNR.

Jobs run as separate processes, one thread each (``--jobs`` at a time); finished ones are reused, so an
interrupted study continues where it stopped.

    python bench/bitwidth_study.py outputs/<run>/checkpoints/stage2-mask.ckpt --out bitwidth_study \\
        --crop 256 --seeds 0 1 --jobs 2 [-- more train.py overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("qat", "fix_encoder", "pdf")  # what a run started from a stage-2 checkpoint trains


def run(command: list[str], log: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as handle:
        return subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode


def sensitivity(args: argparse.Namespace) -> dict:
    out = args.out / "sensitivity"
    results = out / "sensitivity.json"
    if not results.exists():
        command = [sys.executable, "-m", "streamlic.cli", "--threads", "1", "sensitivity", str(args.checkpoint),
                   "-o", str(out), *(["--crop", str(args.crop)] if args.crop else []),
                   *(["--tolerances", *map(str, args.tolerances)] if args.tolerances else [])]
        args.out.mkdir(parents=True, exist_ok=True)
        if run(command, args.out / "sensitivity.log"):
            sys.exit(f"ERROR streamlic sensitivity failed: see {args.out / 'sensitivity.log'}")
    return json.loads(results.read_text())


def configs(study: dict) -> dict[str, list[dict]]:
    """The configs to train, by hardware name: allocations with equal widths are trained once."""
    by_widths: dict[str, list[dict]] = {}
    for record in study["allocations"] + study["uniform"]:
        widths = json.dumps({**record["hardware"], "name": None}, sort_keys=True)
        by_widths.setdefault(widths, []).append(record)
    return {records[0]["hardware"]["name"]: records for records in by_widths.values()}


def train(args: argparse.Namespace, name: str, seed: int) -> Path:
    """One job: ``name``'s widths through stages 3-5 from the checkpoint; its output folder."""
    out = args.out / "runs" / f"{name}-seed{seed}"
    results = out / "results.json"
    if results.exists() and json.loads(results.read_text()).get("status") == "finished":
        return out
    command = [sys.executable, "train.py", f"init_from={args.checkpoint.resolve()}",
               f"hydra.searchpath=[file://{(args.out / 'sensitivity').resolve()}]", f"hardware={name}",
               f"seed={seed}", f"hydra.run.dir={out.resolve()}",
               *([f"data.val_patch_size={args.crop}"] if args.crop else []), *args.overrides]
    out.mkdir(parents=True, exist_ok=True)
    failed = run(command, out.parent / f"{out.name}.log")
    if failed or not results.is_file() or json.loads(results.read_text()).get("status") != "finished":
        sys.exit(f"ERROR {name} seed {seed} did not finish: see {out.parent / f'{out.name}.log'}")
    return out


def spread(values: list[float], scale: float = 100.0, decimals: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:+.{decimals}f}"
    return f"{mean:+.{decimals}f} ± {statistics.stdev(values) * scale:.{decimals}f}"


def stage_losses(results: dict) -> dict[str, float]:
    """Validation loss at QAT entry and at the end of stages 3-5, from a run's stage report (its results.json)."""
    rows = {row["stage"]: row for row in results["stage_report"]}
    return {"qat_entry": rows["qat"]["start"]["loss"], **{stage: rows[stage]["end"]["loss"] for stage in STAGES}}


def table(study: dict, runs: dict[str, list[Path]], named: dict[str, list[dict]]) -> tuple[str, dict]:
    float_loss = study["float"]["loss"]
    lines = [f"Float RD loss of the checkpoint {float_loss:.4f} on {study['images']} validation images "
             f"({study['data']}, crop {study.get('crop') or 'the run’s'}); changes in percent, mean ± std over "
             f"{len(next(iter(runs.values())))} seeds.", "",
             "| config | L | bit cost | weight memory [kbit] | QAT entry | after stage 3 | after stage 4 | "
             "after stage 5 | test bpp | test PSNR [dB] |", "|---" * 10 + "|"]
    summary = {}
    for name, dirs in runs.items():
        record = named[name][0]
        results = [json.loads((run_dir / "results.json").read_text()) for run_dir in dirs]
        losses = [stage_losses(result) for result in results]
        entry = {loss["qat_entry"] for loss in losses}
        # the runs' own QAT entry is the sensitivity command's: the same weights, scales and validation images
        if any(abs(value / record["qat_entry"]["loss"] - 1) > 1e-4 for value in entry):
            sys.exit(f"ERROR {name}: the runs' QAT-entry loss {sorted(entry)} is not the sensitivity command's "
                     f"{record['qat_entry']['loss']:.6f}: not the same validation set or model")
        tests = [result["test"] for result in results]
        changes = {stage: [loss[stage] / float_loss - 1 for loss in losses] for stage in STAGES}
        label = " = ".join(r["name"] for r in named[name])
        lines.append(f"| {label} | {record['latent_bits']} | {record['bit_cost']:,.0f} | "
                     f"{record['weight_memory_bits'] / 1000:,.1f} | {100 * record['qat_entry']['change']:+.2f} | "
                     + " | ".join(spread(changes[stage]) for stage in STAGES) + " | "
                     f"{spread([t['bpp'] for t in tests], 1, 4).lstrip('+')} | "
                     f"{spread([t['psnr'] for t in tests], 1, 2).lstrip('+')} |")
        summary[name] = {"configs": [r["name"] for r in named[name]], "bit_cost": record["bit_cost"],
                         "weight_memory_bits": record["weight_memory_bits"], "latent_bits": record["latent_bits"],
                         "qat_entry_change": record["qat_entry"]["change"], "changes": changes, "test": tests,
                         "runs": [str(run_dir) for run_dir in dirs]}
    return "\n".join(lines) + "\n", summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="stage-2 checkpoint (stage2-mask.ckpt)")
    parser.add_argument("--out", type=Path, default=Path("bitwidth_study"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--crop", type=int, help="validation centre crop of the study and the runs")
    parser.add_argument("--tolerances", type=float, nargs="+")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time (one thread each)")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides (after --)")
    args = parser.parse_args()
    study = sensitivity(args)
    named = configs(study)
    jobs = [(name, seed) for name in named for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = list(pool.map(lambda job: train(args, *job), jobs))
    runs: dict[str, list[Path]] = {}
    for (name, _), run_dir in zip(jobs, dirs):
        runs.setdefault(name, []).append(run_dir)
    text, summary = table(study, runs, named)
    (args.out / "study.md").write_text(text)
    (args.out / "study.json").write_text(json.dumps(summary, indent=2))
    print(text)


if __name__ == "__main__":
    main()
