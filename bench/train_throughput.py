"""Training throughput of each stage through the real Lightning loop, data loading included.

For every stage the default model (or ``--model tiny``) is brought to that stage with the
stage callback's transitions (after a few float batches that gather activation ranges and
sparse-layer statistics, as stage 1 would), then trained for ``--steps`` batches of random
256x256 crops of the demo photos. Images per second are timed from the end of the warm-up
batches to the end of the last batch, so data loading, forward, backward and both
optimizer steps all count.

    python bench/train_throughput.py                                   # CPU, batch 4
    python bench/train_throughput.py --accelerator gpu --batch-size 16 --steps 50 --workers 8 [--compile]

``--compile`` trains with ``module.compile=true`` (on a GPU with ``module.compile_mode=reduce-overhead``,
CUDA graphs); the warm-up batches, where it compiles, are not timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from callbacks import StageSchedule
from streamlic.stage import STAGES

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_BATCHES = 4


def load_train_script():
    spec = importlib.util.spec_from_file_location("streamlic_train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ThroughputTimer(Callback):
    """Wall time from the end of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None
        self.images = 0

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup:
            self.start = self._now(trainer)
        elif batch_idx + 1 > self.warmup:
            self.end = self._now(trainer)
            self.images += batch.shape[0]


def bench_stage(train, cfg, stage: str, steps: int, warmup: int, accelerator: str) -> dict:
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg.data)
    model = train.build_model(cfg)
    datamodule.setup("fit")
    with torch.no_grad():  # stage-1 statistics, so that masks and scales are realistic
        model.train()
        for index, batch in enumerate(datamodule.train_dataloader()):
            if index == CALIBRATION_BATCHES:
                break
            model(batch)
    for name in STAGES[1:STAGES.index(stage) + 1]:
        StageSchedule.enter_stage(model, name)
    module = instantiate(cfg.module, _partial_=True)(model=model)
    timer = ThroughputTimer(warmup)
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_epochs=1, limit_train_batches=warmup + steps,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    seconds = timer.end - timer.start
    return {"stage": stage, "images_per_s": timer.images / seconds, "ms_per_step": 1000 * seconds / steps,
            "images": timer.images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", help="cpu or gpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed training batches per stage")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--model", default="streamlic", help="model config (conf/model/*.yaml)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--compile", action="store_true", help="module.compile=true (warm-up batches compile)")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)

    images_per_epoch = args.batch_size * (args.warmup + args.steps)
    overrides = [f"model={args.model}", f"data.patch_size={args.patch_size}", f"data.batch_size={args.batch_size}",
                 f"data.repeat={-(-images_per_epoch // 5) + 1}", f"data.num_workers={args.workers}",
                 f"data.pin_memory={args.accelerator == 'gpu'}", "paths.output_dir=."]
    if args.compile:
        overrides += ["module.compile=true"] + (["module.compile_mode=reduce-overhead"] if args.accelerator == "gpu" else [])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    train = load_train_script()
    if args.accelerator == "gpu":
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU, {torch.get_num_threads()} threads"
    rows = [bench_stage(train, cfg, stage, args.steps, args.warmup, args.accelerator) for stage in args.stages]

    print(f"\ntraining throughput: model={args.model}, {args.patch_size}x{args.patch_size} crops, batch "
          f"{args.batch_size}, {args.steps} timed steps after {args.warmup}, {args.workers} loader workers, {device}"
          + (", compiled" if args.compile else ""))
    print(f"{'stage':<12} {'images/s':>10} {'ms/step':>10}")
    for row in rows:
        print(f"{row['stage']:<12} {row['images_per_s']:>10.2f} {row['ms_per_step']:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": device,
                                         "stages": rows}, indent=2))


if __name__ == "__main__":
    main()
