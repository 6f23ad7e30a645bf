"""Torch's default CPU threads against the thread policy (streamlic.threads), alone and beside a second training.

    python bench/threads.py [--steps 6] [--repeats 1]

Runs, in fresh processes without OMP_NUM_THREADS (so the policy decides):

* train: ``train.py model=tiny`` for ``--steps`` training steps of each of the five stages
  (64 px crops, batch 2; no test, no export), wall time;
* decompress: ``streamlic decompress`` of a 256x384 demo photo coded by that run's stage-5
  checkpoint, the coding seconds the command reports (start-up excluded);

each with ``threads=0`` (torch's default: one thread per core) and with the policy's default
(one thread), alone and while a second ``train.py model=tiny`` with the same thread setting runs.
Prints a Markdown table (median of ``--repeats``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
TRAIN = [sys.executable, str(ROOT / "train.py"), "model=tiny", "data.patch_size=64", "data.batch_size=2",
         "logger=csv", "test=false", "export=false", "trainer.num_sanity_val_steps=0", "schedule=tiny", *(f"schedule.stages.{stage}.start_epoch={index}"
                            for index, stage in enumerate(("aun", "mask", "qat", "fix_encoder", "pdf")))]
POLICIES = {"torch default (threads=0)": 0, "policy (1 thread)": None}


def _train(run_dir: Path, steps: int, threads: int | None, epochs: int = 5, val_batches: int = 1) -> list[str]:
    extra = [] if threads is None else [f"threads={threads}"]
    return [*TRAIN, f"schedule.max_epochs={epochs}", f"trainer.limit_train_batches={steps}",
            f"trainer.limit_val_batches={val_batches}", f"hydra.run.dir={run_dir}", *extra]


def _background(work: Path, threads: int | None) -> subprocess.Popen:
    """A second training that outlasts any measurement (killed after it)."""
    return subprocess.Popen(_train(work / "background", 1000, threads, epochs=1000, val_batches=0), env=ENV,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _measure(work: Path, steps: int, threads: int | None, coded: Path, checkpoint: Path) -> tuple[float, float]:
    """(train wall seconds, decompress coding seconds) in fresh processes."""
    run_dir = Path(tempfile.mkdtemp(dir=work))
    start = time.perf_counter()
    subprocess.run(_train(run_dir, steps, threads), env=ENV, cwd=ROOT, check=True, capture_output=True)
    train_seconds = time.perf_counter() - start
    option = [] if threads is None else ["--threads", str(threads)]
    decoded = subprocess.run([sys.executable, "-m", "streamlic.cli", *option, "decompress", str(coded), "-c",
                              str(checkpoint), "-o", str(run_dir / "decoded.png")], env=ENV, cwd=ROOT, check=True,
                             capture_output=True, text=True)
    return train_seconds, float(re.search(r"([\d.]+) s$", decoded.stdout.strip()).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps per stage")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(_train(work / "model", args.steps, None), env=ENV, cwd=ROOT, check=True, capture_output=True)
        checkpoint = work / "model" / "checkpoints" / "stage5-pdf.ckpt"
        photo = work / "photo.png"
        subprocess.run([sys.executable, "-c", "from skimage import data; from PIL import Image; "
                        f"Image.fromarray(data.astronaut()[:256, :384]).save({str(photo)!r})"], check=True, env=ENV)
        coded = work / "photo.slic"
        subprocess.run([sys.executable, "-m", "streamlic.cli", "compress", str(photo), "-c", str(checkpoint), "-o",
                        str(coded)], env=ENV, cwd=ROOT, check=True, capture_output=True)
        print(f"| threads | train alone (s) | train beside a training (s) | decompress alone (s) "
              f"| decompress beside a training (s) |\n|---|---|---|---|---|")
        for name, threads in POLICIES.items():
            alone = [_measure(work, args.steps, threads, coded, checkpoint) for _ in range(args.repeats)]
            other = _background(work, threads)
            try:
                time.sleep(15)  # past its start-up: the second process is training
                shared = [_measure(work, args.steps, threads, coded, checkpoint) for _ in range(args.repeats)]
            finally:
                other.kill()
                other.wait()
            cells = [statistics.median(column) for runs in (alone, shared) for column in zip(*runs)]
            print(f"| {name} | {cells[0]:.1f} | {cells[2]:.1f} | {cells[1]:.2f} | {cells[3]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
