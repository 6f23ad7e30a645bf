"""Stop training at the first non-finite gradient or loss, before it reaches the weights.

The check runs inside the main ``optimizer.step()`` (Lightning's ``on_before_optimizer_step``
hook, which manual optimization triggers too), after clipping and before any parameter of
either optimizer moves (the module steps the aux optimizer after the main one).
Raising there ends ``fit`` without a checkpoint save, so the newest checkpoint on disk is
still the last good one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss or gradient; the run stopped with the weights intact."""


def last_good_checkpoint(trainer: L.Trainer) -> str | None:
    """Newest ``last_model_path`` among the run's ModelCheckpoint callbacks, if any was written."""
    paths = [Path(cb.last_model_path) for cb in trainer.checkpoint_callbacks
             if getattr(cb, "last_model_path", "") and Path(cb.last_model_path).is_file()]
    return str(max(paths, key=lambda path: path.stat().st_mtime)) if paths else None


class NonFiniteGuard(Callback):
    """Raise :class:`NonFiniteLossError` on a non-finite gradient (before the step) or loss."""

    state_key = "NonFiniteGuard"  # stateless; named like the others

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]
                 if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
            return
        bad = [name for name, p in pl_module.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        self._stop(trainer, pl_module, f"non-finite gradient in {shown}", "the optimizer step was skipped")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
            self._stop(trainer, pl_module, f"non-finite training loss {float(loss):g}",
                       "the weights are finite but this step is not checkpointed")

    @staticmethod
    def _stop(trainer: L.Trainer, pl_module: L.LightningModule, what: str, consequence: str) -> None:
        stage = getattr(getattr(pl_module, "model", None), "stage", "?")
        checkpoint = last_good_checkpoint(trainer)
        where = f"last good checkpoint: {checkpoint}" if checkpoint else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"{what} at epoch {trainer.current_epoch}, global step {trainer.global_step}, stage {stage}; "
            f"training stopped ({consequence}); {where}. Lower the learning rate or lambda, or check the data, "
            "then resume with ckpt_path=<checkpoint>."
        )
