"""A TQDM progress bar that shows the training stage next to the metrics, and the schedule's epoch."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StageProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar with ``stage=<name>`` first in its postfix.

    Epochs are numbered as the stage schedule (and the stage report) counts them: a run
    started with ``init_from`` at stage 3 shows schedule epochs from that stage's start (the
    module's ``schedule_position``, which the stage schedule publishes).
    """

    state_key = "StageProgressBar"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        model = getattr(pl_module, "model", None)
        if model is not None and hasattr(model, "stage"):
            return {"stage": model.stage, **items}
        return items

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.train_progress_bar.set_description(f"Epoch {pl_module.schedule_position.schedule_epoch(trainer)}")
