"""The five-stage schedule of docs/stages.md as a Lightning callback.

A schedule (``conf/schedule/*.yaml``) gives, for every stage, the epoch at which it starts
and its learning rate, and how the rate moves within a stage (:class:`LRSchedule`). At each
epoch start :class:`StageSchedule` brings the model to the stage of that epoch through the
model's stage API and sets the learning rate; at the last epoch of a stage it evaluates the
validation set, saves ``stageN-<name>.ckpt`` and updates the stage report (a logged table
and a JSON file with each stage's entry and end metrics, transition cost and recovery).

Resuming is safe by construction: the model's stage flags live in its state dict (a
restored model is already in its stage and nothing is recomputed), the transitions are
idempotent, and the callback's own position (first stage, epoch offset, finished stages,
report rows, plateau state) lives in its ``state_dict``.

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
from streamlic.model import StreamLIC
from streamlic.stage import STAGES

log = logging.getLogger(__name__)

STAGE_CHECKPOINT_NAMES = {stage: f"stage{number}-{stage}.ckpt" for number, stage in enumerate(STAGES, start=1)}
STAGE_CHECKPOINT_KEY = "streamlic_stage_checkpoint"  # marks a checkpoint saved without optimizer state


@dataclass(frozen=True)
class StageSpec:
    name: str
    start_epoch: int
    lr: float


LR_SCHEDULES = ("constant", "cosine", "plateau")


@dataclass(frozen=True)
class LRSchedule:
    """How the learning rate moves within each stage (``schedule.lr_schedule``); every stage starts at its ``lr``.

    - ``constant``: the stage's rate throughout.
    - ``cosine``: a half cosine per training step from the stage's rate down to
      ``final_factor`` times it at the stage's last step.
    - ``plateau``: as CompressAI trains (torch's ReduceLROnPlateau, mode min, relative
      threshold): the rate is multiplied by ``factor`` when the validation loss has not gone
      below ``(1 - threshold)`` times its best for more than ``patience`` epochs of the stage.
    """

    name: str = "constant"
    final_factor: float = 0.01
    factor: float = 0.5
    patience: int = 2
    threshold: float = 1e-4

    @classmethod
    def parse(cls, entry: Mapping[str, Any] | None) -> "LRSchedule":
        entry = dict(entry or {})
        unknown = sorted(set(entry) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"schedule.lr_schedule: unknown key(s) {unknown}; "
                              f"expected {list(cls.__dataclass_fields__)}")
        spec = cls(**entry)
        if spec.name not in LR_SCHEDULES:
            raise ConfigError(f"schedule.lr_schedule.name={spec.name!r}: expected one of {list(LR_SCHEDULES)}")
        for key in ("final_factor", "factor"):
            value = getattr(spec, key)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ConfigError(f"schedule.lr_schedule.{key}={value!r}: must be in (0, 1]")
        if not isinstance(spec.patience, int) or spec.patience < 0:
            raise ConfigError(f"schedule.lr_schedule.patience={spec.patience!r}: must be a non-negative integer")
        if not isinstance(spec.threshold, (int, float)) or not 0 <= spec.threshold < 1:
            raise ConfigError(f"schedule.lr_schedule.threshold={spec.threshold!r}: must be in [0, 1)")
        return spec

    def cosine_factor(self, progress: float) -> float:
        """Rate factor at ``progress`` in [0, 1] of a stage."""
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


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
    state = checkpoint.get("callbacks", {}).get(StageSchedule.state_key)
    return list(state["finished"]) if isinstance(state, dict) and "finished" in state else None


def schedule_epochs_done(checkpoint: Mapping[str, Any]) -> int | None:
    """Schedule epochs a Lightning checkpoint's run has completed (``None``: no StageSchedule state)."""
    state = checkpoint.get("callbacks", {}).get(StageSchedule.state_key)
    if not isinstance(state, dict):
        return None
    return state["epoch_offset"] + checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]


class StageSchedule(Callback):
    """Runs the stage schedule; see the module docstring.

    Args:
        stages: ``{stage: {start_epoch, lr}}`` for the five stages (``schedule.stages``).
        lr_schedule: the rate within each stage (``schedule.lr_schedule``, see :class:`LRSchedule`;
            ``None``: constant).
        checkpoint_dir: where ``stage1-aun.ckpt`` ... ``stage5-pdf.ckpt`` are written.
        report_path: the stage report JSON (``None``: only logged).
        start_stage: the stage this run starts in (a later one after ``init_from``).
        evaluate: evaluate the validation set at the start and end of every stage.
    """

    state_key = "StageSchedule"  # its entry in a checkpoint's callback states (read_finished_stages)

    def __init__(self, stages: Mapping[str, Mapping[str, Any]], checkpoint_dir: str | Path,
                 report_path: str | Path | None = None, start_stage: str = "aun", evaluate: bool = True,
                 lr_schedule: Mapping[str, Any] | None = None) -> None:
        self.schedule = parse_schedule(stages)
        self.lr_schedule = LRSchedule.parse(lr_schedule)
        if start_stage not in STAGES:
            raise ConfigError(f"start_stage={start_stage!r}: expected one of {list(STAGES)}")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.report_path = None if report_path is None else Path(report_path)
        self.evaluate = evaluate
        self.start_stage = start_stage
        self.epoch_offset = self.schedule[STAGES.index(start_stage)].start_epoch
        self.finished: list[str] = []
        self.report: dict[str, dict[str, Any]] = {}
        # reduce-on-plateau within the current stage: best validation loss, epochs without progress, reductions
        self.plateau: dict[str, Any] = {"stage": None, "best": math.inf, "bad_epochs": 0, "reductions": 0}
        self._max_epochs_shifted = False
        self._writing_stage_checkpoint = False
        self._reported: list[dict[str, Any]] = []  # rows as last logged

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"start_stage": self.start_stage, "epoch_offset": self.epoch_offset, "finished": list(self.finished),
                "report": {name: dict(row) for name, row in self.report.items()},
                "schedule": [asdict(spec) for spec in self.schedule], "plateau": dict(self.plateau)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("schedule") != [asdict(spec) for spec in self.schedule]:
            log.warning("resuming with a stage schedule that differs from the checkpoint's: %s (checkpoint) vs %s",
                        state_dict.get("schedule"), [asdict(spec) for spec in self.schedule])
        self.start_stage = state_dict["start_stage"]
        self.epoch_offset = state_dict["epoch_offset"]
        self.finished = list(state_dict["finished"])
        self.report = {name: dict(row) for name, row in state_dict["report"].items()}
        self.plateau = dict(state_dict.get("plateau", self.plateau))

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
        # published before any epoch starts (callback states are restored by now), whatever the callbacks' order
        pl_module.schedule_position.epoch_offset = self.epoch_offset
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
        # what the other callbacks read of the schedule (streamlic.stage.SchedulePosition)
        pl_module.schedule_position.epoch_offset = self.epoch_offset
        pl_module.schedule_position.stage_last_epoch = self.last_epoch_of(target, trainer)
        for index in range(current + 1, target + 1):
            self.enter_stage(model, STAGES[index], epoch)
        if target > current:
            pl_module.reset_optimizer_states()
        spec = self.schedule[target]
        if self.plateau["stage"] != spec.name:  # every stage starts at its own rate
            self.plateau = {"stage": spec.name, "best": math.inf, "bad_epochs": 0, "reductions": 0}
        pl_module.set_learning_rate(self.learning_rate(trainer, 0))
        row = self.report.setdefault(spec.name, {"stage": spec.name, "number": target + 1, "start_epoch": epoch,
                                                 "lr": spec.lr})
        if "start" not in row:
            row["start"] = self._evaluate(trainer, pl_module)
            previous = self.report.get(STAGES[target - 1]) if target > 0 else None
            if previous is not None:
                row["transition"] = metric_change(previous.get("end"), row["start"])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.lr_schedule.name == "cosine":
            pl_module.set_learning_rate(self.learning_rate(trainer, batch_idx))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = self.schedule_epoch(trainer)
        index = STAGES.index(pl_module.model.stage)
        if self.lr_schedule.name == "plateau":
            self.update_plateau(trainer)
        if epoch == self.last_epoch_of(index, trainer) and STAGES[index] not in self.finished:
            self.finish_stage(trainer, pl_module, index, epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write_report(trainer, whole=True)

    # ------------------------------------------------------------------ learning rate
    def learning_rate(self, trainer: L.Trainer, batch_idx: int) -> float:
        """The main optimizer's rate at batch ``batch_idx`` of the current epoch.

        A function of the schedule position and the plateau state only (both in this
        callback's checkpointed state), so a resumed run uses the rates of an uninterrupted one.
        """
        epoch = self.schedule_epoch(trainer)
        index = self.stage_index_at(epoch)
        spec = self.schedule[index]
        if self.lr_schedule.name == "plateau":
            return spec.lr * self.lr_schedule.factor ** self.plateau["reductions"]
        last_epoch = self.last_epoch_of(index, trainer)
        if self.lr_schedule.name == "constant" or last_epoch is None:
            return spec.lr
        steps_per_epoch = max(1, int(trainer.num_training_batches))
        stage_steps = (last_epoch + 1 - spec.start_epoch) * steps_per_epoch
        step = (epoch - spec.start_epoch) * steps_per_epoch + batch_idx
        return spec.lr * self.lr_schedule.cosine_factor(step / max(1, stage_steps - 1))

    def update_plateau(self, trainer: L.Trainer) -> None:
        """One epoch of reduce-on-plateau on the epoch's validation loss (``val/loss``)."""
        loss = trainer.callback_metrics.get("val/loss")
        if loss is None:
            log.warning("schedule.lr_schedule.name=plateau: no val/loss this epoch; the rate stays")
            return
        state, rule = self.plateau, self.lr_schedule
        if float(loss) < state["best"] * (1.0 - rule.threshold):
            state.update(best=float(loss), bad_epochs=0)
            return
        state["bad_epochs"] += 1
        if state["bad_epochs"] > rule.patience:
            state.update(reductions=state["reductions"] + 1, bad_epochs=0)
            log.info("stage %s: validation loss on a plateau; learning rate x%g", state["stage"], rule.factor)

    # ------------------------------------------------------------------ transitions
    @staticmethod
    def enter_stage(model: StreamLIC, stage: str, epoch: int | None = None) -> None:
        """Apply one stage's transition (docs/stages.md); every call is idempotent."""
        log.info("%sentering stage %d (%s)", "" if epoch is None else f"schedule epoch {epoch}: ",
                 STAGES.index(stage) + 1, stage)
        model.enter_stage(stage)

    def finish_stage(self, trainer: L.Trainer, pl_module: L.LightningModule, index: int, epoch: int) -> None:
        name = STAGES[index]
        row = self.report.setdefault(name, {"stage": name, "number": index + 1, "start_epoch": epoch,
                                            "lr": self.schedule[index].lr})
        path = self.checkpoint_dir / STAGE_CHECKPOINT_NAMES[name]
        row.update(end_epoch=epoch, end=self._evaluate(trainer, pl_module), checkpoint=str(path))
        row["recovery"] = metric_change(row.get("start"), row["end"])
        self.finished.append(name)  # before saving: the checkpoint records that its stage is finished
        self._writing_stage_checkpoint = True
        try:
            trainer.save_checkpoint(path, weights_only=False)
        finally:
            self._writing_stage_checkpoint = False
        self.write_report(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._writing_stage_checkpoint:
            # every stage starts with fresh optimizers, so a stage checkpoint needs none to resume the
            # run at the next stage: without them it is 40 % of a resumable checkpoint
            checkpoint.pop("optimizer_states", None)
            checkpoint.pop("lr_schedulers", None)
            checkpoint[STAGE_CHECKPOINT_KEY] = True

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get(STAGE_CHECKPOINT_KEY):
            # resuming at the next stage, whose start resets the optimizers: Lightning restores fresh ones
            checkpoint["optimizer_states"] = [optimizer.state_dict() for optimizer in pl_module.configure_optimizers()]
            checkpoint["lr_schedulers"] = []

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

    def write_report(self, trainer: L.Trainer, whole: bool = False) -> None:
        """Write stage_report.json and log the rows that changed since the last call (all rows if ``whole``)."""
        if not trainer.is_global_zero:
            return
        changed = [row for row in self.rows() if row not in self._reported]
        if changed or whole:
            log.info("stage report (validation set):\n%s", format_report(self.rows() if whole else changed))
        if not changed:
            return
        self._reported = copy.deepcopy(self.rows())
        if self.report_path is not None:
            self.report_path.parent.mkdir(parents=True, exist_ok=True)
            self.report_path.write_text(json.dumps({"stages": self.rows(), "finished": self.finished}, indent=2))


CHANGE_METRICS = ("loss", "bpp", "psnr", "ms_ssim")


def metric_change(before: Mapping[str, float] | None, after: Mapping[str, float] | None) -> dict[str, float] | None:
    """``after - before`` of each evaluation metric (``None`` if either evaluation is missing).

    In the report, a stage's ``transition`` is its entry minus the previous stage's end (same
    weights: what the transition itself costs) and its ``recovery`` is its end minus its entry
    (what training within the stage wins back).
    """
    if not before or not after:
        return None
    return {key: after[key] - before[key] for key in CHANGE_METRICS if key in before and key in after}


def format_report(rows: list[dict[str, Any]]) -> str:
    """The stage report as a fixed-width text table.

    Per stage: bpp, PSNR and MS-SSIM at entry -> end; the transition cost (entry minus the
    previous stage's end) and the recovery (end minus entry) in bpp / PSNR; the number of
    latent symbols clamped to +-127 at entry.
    """

    def pair(row: dict[str, Any], key: str, fmt: str) -> str:
        values = [row.get(when) or {} for when in ("start", "end")]
        return " -> ".join(format(v[key], fmt) if key in v else "-" for v in values)

    def change(row: dict[str, Any], key: str) -> str:
        delta = row.get(key) or {}
        return f"{delta['bpp']:+.4f} / {delta['psnr']:+.2f}" if {"bpp", "psnr"} <= set(delta) else "-"

    header = (f"{'stage':<15} {'epochs':<9} {'bpp':<17} {'PSNR [dB]':<15} {'MS-SSIM':<17} "
              f"{'transition bpp/dB':<18} {'recovery bpp/dB':<18} {'clamped@entry':<13} checkpoint")
    lines = [header, "-" * len(header)]
    for row in rows:
        end_epoch = row.get("end_epoch")
        epochs = f"{row['start_epoch']}-{'' if end_epoch is None else end_epoch}"
        checkpoint = Path(row["checkpoint"]).name if row.get("checkpoint") else "(not finished)"
        clamped = (row.get("start") or {}).get("clamped_symbols")
        lines.append(f"{str(row['number']) + ' ' + row['stage']:<15} {epochs:<9} {pair(row, 'bpp', '.4f'):<17} "
                     f"{pair(row, 'psnr', '.2f'):<15} {pair(row, 'ms_ssim', '.4f'):<17} "
                     f"{change(row, 'transition'):<18} {change(row, 'recovery'):<18} "
                     f"{'-' if clamped is None else int(clamped):<13} {checkpoint}")
    return "\n".join(lines)
