"""An exponential moving average of the trained weights, used for evaluation and committed at each stage's end.

Averaging smooths the last noisy steps of a stage. In a hardware-exact framework the numbers
reported must be the numbers exported, so the average is not kept apart: the validation loop
evaluates it, and at the last epoch of every stage it replaces the weights before the stage
is evaluated and saved. The stage report, the stage checkpoint, the export and the next stage
then all use the same weights. The average restarts with each stage (new numerics, new
parameters training) and covers only the parameters that stage trains.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from streamlic.config import ConfigError


class WeightAverage(Callback):
    """EMA of the trainable parameters with ``decay`` per step (``None``: off).

    It reads the stage's end from the module's ``schedule_position`` (which the stage schedule
    publishes; without one, the run's last epoch ends the stage). Listed before the stage
    schedule in ``conf/callbacks/default.yaml``, so that a stage's evaluation and checkpoint
    see the committed average.
    """

    state_key = "WeightAverage"  # its entry in a checkpoint's callback states

    def __init__(self, decay: float | None = None) -> None:
        if decay is not None and not 0.0 < decay < 1.0:
            raise ConfigError(f"ema_decay={decay!r}: must lie in (0, 1), or be null to train without an average")
        self.decay = decay
        self.stage: str | None = None
        self.average: dict[str, Tensor] = {}
        self._held: dict[str, Tensor] = {}  # the trained weights while the average is evaluated

    @staticmethod
    def _trained(pl_module: L.LightningModule) -> dict[str, Tensor]:
        return {name: parameter for name, parameter in pl_module.model.named_parameters() if parameter.requires_grad}

    # ------------------------------------------------------------------ averaging
    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.decay is None:
            return
        trained = self._trained(pl_module)
        if self.stage != pl_module.model.stage or self.average.keys() != trained.keys():
            self.stage = pl_module.model.stage
            self.average = {name: parameter.detach().clone() for name, parameter in trained.items()}
            return
        for name, parameter in trained.items():
            self.average[name].lerp_(parameter.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def _swap(self, pl_module: L.LightningModule, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """Put ``weights`` into the model; returns the ones they replaced."""
        parameters = dict(pl_module.model.named_parameters())
        replaced = {name: parameters[name].detach().clone() for name in weights}
        for name, value in weights.items():
            parameters[name].copy_(value)
        return replaced

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.decay is not None and self.average and trainer.state.fn == TrainerFn.FITTING:
            self._held = self._swap(pl_module, self.average)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._held:
            self._swap(pl_module, self._held)
            self._held = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """At a stage's last epoch the average becomes the weights (before the stage callback evaluates and saves)."""
        if self.decay is None or not self.average:
            return
        if pl_module.schedule_position.stage_ends_this_epoch(trainer):
            self._swap(pl_module, self.average)
            self.average = {}
            self.stage = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "stage": self.stage,
                "average": {name: value.clone() for name, value in self.average.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage = state_dict["stage"]
        self.average = {name: value.clone() for name, value in state_dict["average"].items()}
