"""A TQDM progress bar that shows the training stage next to the metrics; plain text lines when not on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger(__name__)


class StageProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar with ``stage=<name>`` first in its postfix.

    Epochs are numbered as the stage schedule (and the stage report) counts them: a run
    started with ``init_from`` at stage 3 shows schedule epochs from that stage's start (the
    module's ``schedule_position``, which the stage schedule publishes).

    When stdout is not a terminal (a log file, a batch job) the bars, which redraw themselves
    with carriage returns, are off and a line is logged every ``text_every_n_steps`` training
    steps and at each epoch end instead. ``text``: true/false forces either; null decides by stdout.
    """

    state_key = "StageProgressBar"

    def __init__(self, *args: Any, text: bool | None = None, text_every_n_steps: int = 50, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.text = not sys.stdout.isatty() if text is None else text
        self.text_every_n_steps = text_every_n_steps
        if self.text:
            self.disable()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        model = getattr(pl_module, "model", None)
        if model is not None and hasattr(model, "stage"):
            return {"stage": model.stage, **items}
        return items

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.train_progress_bar.set_description(f"Epoch {pl_module.schedule_position.schedule_epoch(trainer)}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.text and (batch_idx + 1) % self.text_every_n_steps == 0:
            self._log_line(trainer, pl_module, f"step {batch_idx + 1}/{self.total_train_batches}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.text:
            self._log_line(trainer, pl_module, "end")

    def _log_line(self, trainer: L.Trainer, pl_module: L.LightningModule, where: str) -> None:
        if trainer.is_global_zero:
            metrics = self.get_metrics(trainer, pl_module)
            shown = ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                              for key, value in metrics.items() if key != "v_num")
            log.info("epoch %d %s: %s", pl_module.schedule_position.schedule_epoch(trainer), where, shown)
