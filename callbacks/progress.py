"""A TQDM progress bar that shows the training stage next to the metrics."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StageProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar with ``stage=<name>`` first in its postfix."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        model = getattr(pl_module, "model", None)
        if model is not None and hasattr(model, "stage"):
            return {"stage": model.stage, **items}
        return items
