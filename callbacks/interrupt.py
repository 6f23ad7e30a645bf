"""Stop a run on Ctrl-C (SIGINT) or SIGTERM at the end of the current training step, with a checkpoint there.

Lightning turns SIGTERM into a flag (``trainer.received_sigterm``) that ends ``fit`` after the
step, but it saves nothing; a Ctrl-C is a ``KeyboardInterrupt`` wherever it lands, possibly
between the two optimizers' steps. :class:`Interruption` makes SIGINT a flag too and, at the
end of the step the flag (or Lightning's) is seen, saves ``last.ckpt`` exactly as a step
checkpoint is saved, then ends ``fit`` with :class:`RunInterrupted`. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


log = logging.getLogger(__name__)


class RunInterrupted(Exception):
    """The run stopped on a signal after a training step; ``last.ckpt`` holds that step."""

    def __init__(self, signal_name: str, stage: str, epoch: int, step: int, checkpoint: str) -> None:
        super().__init__(f"{signal_name} at stage {stage}, schedule epoch {epoch}, step {step}")
        self.signal_name, self.stage, self.epoch = signal_name, stage, epoch
        self.step, self.checkpoint = step, checkpoint

    def as_dict(self) -> dict[str, Any]:
        return {"signal": self.signal_name, "stage": self.stage, "epoch": self.epoch, "step": self.step,
                "checkpoint": self.checkpoint}


class Interruption(Callback):
    """See the module docstring.

    Args:
        checkpoint_path: where the step checkpoint of an interrupted run goes (the run's ``last.ckpt``).
    """

    state_key = "Interruption"  # stateless; named like the others

    def __init__(self, checkpoint_path: str | Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.received: str | None = None
        self._previous_handler: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        if threading.current_thread() is threading.main_thread():  # only there can Python set a handler
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.received:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, last.ckpt stays at the last saved step
        self.received = "SIGINT"
        log.warning("SIGINT: stopping after this training step (Ctrl-C again to stop at once)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        name = self.received or ("SIGTERM" if trainer.received_sigterm else None)
        if name is None:
            return
        trainer.save_checkpoint(self.checkpoint_path)
        epoch = pl_module.schedule_position.schedule_epoch(trainer)
        raise RunInterrupted(name, pl_module.model.stage, epoch, trainer.global_step, str(self.checkpoint_path))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None
