"""The five-stage schedule of DESIGN §5 as a Lightning callback.

A schedule (``conf/schedule/*.yaml``) gives, for every stage, the epoch at which it starts
and its learning rate. At each epoch start :class:`StageSchedule` brings the model to the
stage of that epoch through the model's stage API and sets the learning rate; at the last
epoch of a stage it evaluates the validation set, saves ``stageN-<name>.ckpt`` and updates
the stage report (a logged table and a JSON file).

Resuming is safe by construction: the model's stage flags live in its state dict (a
restored model is already in its stage and nothing is recomputed), the transitions are
idempotent, and the callback's own position (first stage, epoch offset, finished stages,
report rows) lives in its ``state_dict``.

Epochs: the schedule counts epochs from the start of stage 1. A run started from a stage
checkpoint (``init_from``) begins at the next stage's start epoch, so its run epoch 0 is
schedule epoch ``start_epoch`` of that stage, and ``trainer.max_epochs`` (given in schedule
epochs) is shortened by the same offset.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from streamlic.config import ConfigError
from streamlic.distributed import average_sparse_statistics, max_activation_ranges
from streamlic.model import STAGES, StreamLIC

log = logging.getLogger(__name__)

STAGE_CHECKPOINT_NAMES = {stage: f"stage{number}-{stage}.ckpt" for number, stage in enumerate(STAGES, start=1)}
STAGE_CHECKPOINT_KEY = "streamlic_stage_checkpoint"  # marks a checkpoint saved without optimizer state


@dataclass(frozen=True)
class StageSpec:
    name: str
    start_epoch: int
    lr: float


def parse_schedule(stages: Mapping[str, Mapping[str, Any]]) -> list[StageSpec]:
    """Validate ``schedule.stages``: all five stages in order, strictly increasing start epochs from 0."""
    stages = dict(stages)
    if list(stages) != list(STAGES):
        raise ConfigError(f"schedule.stages: expected the stages {list(STAGES)} in this order, got {list(stages)}")
    specs = []
    for name, entry in stages.items():
        entry = dict(entry)
        unknown = sorted(set(entry) - {"start_epoch", "lr"})
        if unknown:
            raise ConfigError(f"schedule.stages.{name}: unknown key(s) {unknown}; expected start_epoch and lr")
        start, lr = entry.get("start_epoch"), entry.get("lr")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ConfigError(f"schedule.stages.{name}.start_epoch={start!r}: must be a non-negative integer")
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"schedule.stages.{name}.lr={lr!r}: must be a positive number")
        specs.append(StageSpec(name, start, float(lr)))
    if specs[0].start_epoch != 0:
        raise ConfigError(f"schedule.stages.aun.start_epoch={specs[0].start_epoch}: stage 1 must start at epoch 0")
    for before, after in zip(specs, specs[1:]):
        if after.start_epoch <= before.start_epoch:
            raise ConfigError(
                f"schedule.stages.{after.name}.start_epoch={after.start_epoch}: must be later than "
                f"schedule.stages.{before.name}.start_epoch={before.start_epoch} "
                "(every stage trains at least one epoch)"
            )
    return specs


def read_finished_stages(checkpoint: Mapping[str, Any]) -> list[str] | None:
    """Stages a Lightning checkpoint's StageSchedule state marks finished (``None``: no such state)."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith(StageSchedule.__qualname__) and isinstance(state, dict) and "finished" in state:
            return list(state["finished"])
    return None


class StageSchedule(Callback):
    """Runs the stage schedule; see the module docstring.

    Args:
        stages: ``{stage: {start_epoch, lr}}`` for the five stages (``schedule.stages``).
        checkpoint_dir: where ``stage1-aun.ckpt`` ... ``stage5-pdf.ckpt`` are written.
        report_path: the stage report JSON (``None``: only logged).
        start_stage: the stage this run starts in (a later one after ``init_from``).
        evaluate: evaluate the validation set at the start and end of every stage.
    """

    def __init__(self, stages: Mapping[str, Mapping[str, Any]], checkpoint_dir: str | Path,
                 report_path: str | Path | None = None, start_stage: str = "aun", evaluate: bool = True) -> None:
        self.schedule = parse_schedule(stages)
        if start_stage not in STAGES:
            raise ConfigError(f"start_stage={start_stage!r}: expected one of {list(STAGES)}")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.report_path = None if report_path is None else Path(report_path)
        self.evaluate = evaluate
        self.start_stage = start_stage
        self.epoch_offset = self.schedule[STAGES.index(start_stage)].start_epoch
        self.finished: list[str] = []
        self.report: dict[str, dict[str, Any]] = {}
        self._max_epochs_shifted = False
        self._writing_stage_checkpoint = False
        self._reported: list[dict[str, Any]] | None = None  # rows as last logged

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"start_stage": self.start_stage, "epoch_offset": self.epoch_offset, "finished": list(self.finished),
                "report": {name: dict(row) for name, row in self.report.items()},
                "schedule": [asdict(spec) for spec in self.schedule]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("schedule") != [asdict(spec) for spec in self.schedule]:
            log.warning("resuming with a stage schedule that differs from the checkpoint's: %s (checkpoint) vs %s",
                        state_dict.get("schedule"), [asdict(spec) for spec in self.schedule])
        self.start_stage = state_dict["start_stage"]
        self.epoch_offset = state_dict["epoch_offset"]
        self.finished = list(state_dict["finished"])
        self.report = {name: dict(row) for name, row in state_dict["report"].items()}

    # ------------------------------------------------------------------ schedule
    def schedule_epoch(self, trainer: L.Trainer) -> int:
        return trainer.current_epoch + self.epoch_offset

    def stage_index_at(self, epoch: int) -> int:
        """Index of the stage that schedule epoch ``epoch`` belongs to (never before the start stage)."""
        index = max(i for i, spec in enumerate(self.schedule) if spec.start_epoch <= epoch)
        return max(index, STAGES.index(self.start_stage))

    def last_epoch_of(self, index: int, trainer: L.Trainer) -> int | None:
        """Schedule epoch at whose end stage ``index`` finishes (the run's last epoch for stage 5)."""
        if index + 1 < len(self.schedule):
            return self.schedule[index + 1].start_epoch - 1
        max_epochs = trainer.max_epochs
        return None if max_epochs is None or max_epochs < 0 else max_epochs - 1 + self.epoch_offset

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.max_epochs is given in schedule epochs; a run that starts at a later stage is shorter
        if self.epoch_offset and not self._max_epochs_shifted and trainer.max_epochs not in (None, -1):
            if trainer.max_epochs <= self.epoch_offset:
                raise ConfigError(
                    f"trainer.max_epochs={trainer.max_epochs}: the run starts at schedule epoch {self.epoch_offset} "
                    f"(stage {self.start_stage}), so it would train no epoch"
                )
            trainer.fit_loop.max_epochs = trainer.max_epochs - self.epoch_offset
            self._max_epochs_shifted = True
            log.info("starting at stage %s = schedule epoch %d; this run trains %d epochs", self.start_stage,
                     self.epoch_offset, trainer.max_epochs)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model: StreamLIC = pl_module.model
        epoch = self.schedule_epoch(trainer)
        target = self.stage_index_at(epoch)
        current = STAGES.index(model.stage)
        if current > target:
            raise RuntimeError(
                f"the model is in stage {model.stage} but schedule epoch {epoch} belongs to stage "
                f"{STAGES[target]}; resume with the schedule the run was started with"
            )
        for index in range(current + 1, target + 1):
            self.enter_stage(model, STAGES[index], epoch)
        spec = self.schedule[target]
        pl_module.set_learning_rate(spec.lr)
        row = self.report.setdefault(spec.name, {"stage": spec.name, "number": target + 1, "start_epoch": epoch,
                                                 "lr": spec.lr})
        if "start" not in row:
            row["start"] = self._evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = self.schedule_epoch(trainer)
        index = STAGES.index(pl_module.model.stage)
        if epoch == self.last_epoch_of(index, trainer) and STAGES[index] not in self.finished:
            self.finish_stage(trainer, pl_module, index, epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write_report(trainer)

    # ------------------------------------------------------------------ transitions
    @staticmethod
    def enter_stage(model: StreamLIC, stage: str, epoch: int | None = None) -> None:
        """Apply one stage's transition (DESIGN §5); every call is idempotent."""
        log.info("%sentering stage %d (%s)", "" if epoch is None else f"schedule epoch {epoch}: ",
                 STAGES.index(stage) + 1, stage)
        # ranks must agree on what the masks and frozen scales are computed from
        if stage == "mask" and not model.masks_set and average_sparse_statistics(model):
            log.info("sparse-layer input statistics averaged over all ranks before the masks are cut")
        if stage == "qat" and not model.scales_frozen and max_activation_ranges(model):
            log.info("activation ranges max-reduced over all ranks before the scales freeze")
        model.enter_stage(stage)

    def finish_stage(self, trainer: L.Trainer, pl_module: L.LightningModule, index: int, epoch: int) -> None:
        name = STAGES[index]
        row = self.report.setdefault(name, {"stage": name, "number": index + 1, "start_epoch": epoch,
                                            "lr": self.schedule[index].lr})
        path = self.checkpoint_dir / STAGE_CHECKPOINT_NAMES[name]
        row.update(end_epoch=epoch, end=self._evaluate(trainer, pl_module), checkpoint=str(path))
        self.finished.append(name)  # before saving: the checkpoint records that its stage is finished
        self._writing_stage_checkpoint = True
        try:
            trainer.save_checkpoint(path, weights_only=False)
        finally:
            self._writing_stage_checkpoint = False
        self.write_report(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._writing_stage_checkpoint:
            # a stage checkpoint starts new runs (init_from) and exports, which need the model and the
            # callbacks' record but not the optimizer: without it it is 40 % of a resumable checkpoint
            checkpoint.pop("optimizer_states", None)
            checkpoint.pop("lr_schedulers", None)
            checkpoint[STAGE_CHECKPOINT_KEY] = True

    # ------------------------------------------------------------------ report
    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        if not self.evaluate:
            return None
        # every rank evaluates the whole validation set, so the numbers agree without a reduction
        datamodule = trainer.datamodule
        loader = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
        if loader is None:
            return None
        with torch.random.fork_rng(devices=[]):  # evaluation must not move the training noise
            return pl_module.evaluate(loader)

    def rows(self) -> list[dict[str, Any]]:
        return [self.report[name] for name in STAGES if name in self.report]

    def write_report(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or self.rows() == self._reported:
            return
        self._reported = copy.deepcopy(self.rows())
        log.info("stage report (validation set):\n%s", format_report(self.rows()))
        if self.report_path is not None:
            self.report_path.parent.mkdir(parents=True, exist_ok=True)
            self.report_path.write_text(json.dumps({"stages": self.rows(), "finished": self.finished}, indent=2))


def format_report(rows: list[dict[str, Any]]) -> str:
    """The stage report as a fixed-width text table (start -> end of each stage)."""

    def pair(row: dict[str, Any], key: str, fmt: str) -> str:
        values = [row.get(when) or {} for when in ("start", "end")]
        return " -> ".join(format(v[key], fmt) if key in v else "-" for v in values)

    header = f"{'stage':<15} {'epochs':<9} {'bpp':<17} {'PSNR [dB]':<17} {'MS-SSIM':<17} checkpoint"
    lines = [header, "-" * len(header)]
    for row in rows:
        end_epoch = row.get("end_epoch")
        epochs = f"{row['start_epoch']}-{'' if end_epoch is None else end_epoch}"
        checkpoint = Path(row["checkpoint"]).name if row.get("checkpoint") else "(not finished)"
        lines.append(f"{str(row['number']) + ' ' + row['stage']:<15} {epochs:<9} {pair(row, 'bpp', '.4f'):<17} "
                     f"{pair(row, 'psnr', '.2f'):<17} {pair(row, 'ms_ssim', '.4f'):<17} {checkpoint}")
    return "\n".join(lines)
