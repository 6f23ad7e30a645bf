"""The LightningModule that trains StreamLIC through its five stages (docs/stages.md).

The module owns the loss, the optimizers and the metrics; *when* a stage starts and at
which learning rate is decided by the stage callback (``callbacks.StageSchedule``), which
calls :meth:`StreamLICModule.set_learning_rate` and the model's stage API.

Optimization is manual because there are two optimizers: Adam over every parameter except
the EntropyBottleneck quantiles (the "main" one), and Adam over the quantiles for
compressai's auxiliary loss. The main optimizer always holds *all* main parameters in one
group, whatever the stage: frozen parameters simply have no gradient, and Adam leaves a
parameter without a gradient untouched. So the parameter groups are the same in every
stage and after every resume. Every stage starts with fresh optimizer state
(:meth:`StreamLICModule.reset_optimizer_states`): a stage checkpoint, which holds none,
resumes exactly.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.image import PeakSignalNoiseRatio

from .data import mixed_seed
from .metrics import ms_ssim, rate_distortion
from .model import StreamLIC
from .stage import STAGES, SchedulePosition
from .topology import pad_to_multiple  # the codec's padding rule: whole images to a multiple of 64

log = logging.getLogger(__name__)

AUX_PARAMETER_SUFFIX = ".quantiles"  # the EntropyBottleneck's quantiles train on the aux loss only
# lambda of CompressAI's pretrained quality levels 1..8 per distortion: users compare against those curves
COMPRESSAI_LAMBDAS = {
    "mse": (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932, 0.1800),
    "ms-ssim": (2.40, 4.58, 8.73, 16.64, 31.73, 60.50, 115.37, 220.00),
}


def quality_lambda(quality: int, distortion: str) -> float:
    """The lambda of CompressAI's quality level ``quality`` (1..8) for ``distortion``."""
    levels = COMPRESSAI_LAMBDAS[distortion]
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= len(levels):
        raise ValueError(f"module.quality={quality!r}: expected an integer from 1 to {len(levels)}")
    return levels[quality - 1]


class RateDistortionMetrics(nn.Module):
    """torchmetrics state of one split: loss, bpp, PSNR and MS-SSIM averaged per image, clamped symbols.

    ``sync_on_compute=False`` is for data that every rank sees whole (no DDP reduction).
    """

    def __init__(self, sync_on_compute: bool = True) -> None:
        super().__init__()
        sync = {"sync_on_compute": sync_on_compute}
        self.loss = MeanMetric(**sync)
        self.bpp = MeanMetric(**sync)
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), **sync)
        self.ms_ssim = MeanMetric(**sync)
        self.clamped_symbols = SumMetric(**sync)

    def forward(self, loss: Tensor, bpp: Tensor, x_hat: Tensor, x: Tensor, clamped: Tensor,
                with_ms_ssim: bool = True) -> None:
        """Accumulate one batch (through each metric's forward, so per-step values can be logged);
        ``with_ms_ssim=False`` leaves the batch out of MS-SSIM."""
        batch = x.shape[0]
        x_hat = x_hat.detach().clamp(0.0, 1.0)
        self.loss(loss.detach(), weight=batch)
        self.bpp(bpp.detach(), weight=batch)
        self.psnr(x_hat, x)
        if with_ms_ssim:
            self.ms_ssim(ms_ssim(x_hat.float(), x.float()))
        self.clamped_symbols(clamped)

    def items(self) -> dict[str, Any]:
        return {"loss": self.loss, "bpp": self.bpp, "psnr": self.psnr, "ms_ssim": self.ms_ssim,
                "clamped_symbols": self.clamped_symbols}

    def compute(self) -> dict[str, float]:
        return {name: float(metric.compute()) for name, metric in self.items().items()}

    def reset(self) -> None:
        for metric in self.items().values():
            metric.reset()


def forward_and_loss(model: StreamLIC, x: Tensor, target: Tensor, lmbda: float,
                     distortion: str) -> tuple[dict[str, Any], dict[str, Tensor], Tensor]:
    """The model's output on ``x``, its loss terms against ``target`` and the symbols it clamped.

    ``x`` may be ``target`` padded (whole images in evaluation): the output is cropped back to
    the target's size and the rate counts the target's pixels.
    """
    model.clamped_symbols.zero_()  # counts the symbols clamped in this batch only
    out = model(x)
    height, width = target.shape[-2:]
    if x.shape[-2:] != target.shape[-2:]:
        out["x_hat"] = out["x_hat"][..., :height, :width]
    return out, rate_distortion(out, target, lmbda, distortion), model.clamped_symbols.clone()


class CompiledForward:
    """:func:`forward_and_loss` through ``torch.compile``, logging each compilation with its time.

    Training compiles the whole step (forward, loss and so their backward; in stages 4 and 5 the
    row loop of a training crop unrolled into it): once per stage, as the stage flags are Python
    attributes of the layers. Evaluation, on whole images of any size, compiles the row loop's
    body instead (:meth:`StreamLIC.decode_row`, one graph for all rows of all images of a width)
    and runs the rest eagerly, so a large image does not unroll a long loop into one graph.
    Up to ``recompile_limit`` graphs are kept per function, then dynamo warns and runs eagerly.
    Inductor draws random numbers with the eager generator (``fallback_random``), so a compiled
    step adds the same noise as an eager one and both give the same integers.
    """

    def __init__(self, function, mode: str | None = None, recompile_limit: int = 64):
        import torch._dynamo
        import torch._inductor.config

        torch._inductor.config.fallback_random = True
        self._arguments = (function, mode, recompile_limit)
        self._function = function
        self._compiled = torch.compile(function, mode=mode)
        compiled_row = torch.compile(StreamLIC.decode_row, mode=mode)

        def row_step(model, *rows):
            # ep's row is kept until the loop ends: a copy, as CUDA graphs reuse their outputs' memory
            y_hat_row, residual, ep = compiled_row(model, *rows)
            return y_hat_row, residual, ep.clone()

        self._row_step = row_step
        self._counters = torch._dynamo.utils.counters
        self._limits = torch._dynamo.config.patch(recompile_limit=recompile_limit)
        self.compile_seconds = 0.0

    def __getstate__(self) -> dict:
        # compiled functions do not pickle (DDP's spawn start method pickles the module): rebuilt on load
        return {"arguments": self._arguments, "compile_seconds": self.compile_seconds}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["arguments"])
        self.compile_seconds = state["compile_seconds"]

    def __call__(self, model: StreamLIC, x: Tensor, *args):
        graphs = self._counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        with self._limits:
            if model.training:
                result = self._compiled(model, x, *args)
            else:
                with model.rows_through(self._row_step):
                    result = self._function(model, x, *args)
        if self._counters["stats"]["unique_graphs"] != graphs:
            seconds = time.perf_counter() - start
            self.compile_seconds += seconds
            log.info("compiled the %s of stage %s for input %s in %.1f s (first run included)",
                     "training step" if model.training else "row loop", model.stage, tuple(x.shape), seconds)
        return result


class StreamLICModule(L.LightningModule):
    """Trains a :class:`StreamLIC` model on ``lmbda * distortion + bpp``.

    Args:
        model: the network (its stage flags travel in its state dict).
        lmbda: rate-distortion trade-off; the distortion is ``255**2 * MSE`` for ``"mse"``
            and ``1 - MS-SSIM`` for ``"ms-ssim"``.
        distortion: ``"mse"`` or ``"ms-ssim"``.
        quality: CompressAI's quality level 1..8; when given, ``lmbda`` is that level's
            lambda for ``distortion`` (:data:`COMPRESSAI_LAMBDAS`) and the ``lmbda`` argument is ignored.
        learning_rate: main optimizer's initial rate; the stage callback sets the rate of
            each stage at every epoch start.
        aux_learning_rate: rate of the EntropyBottleneck quantiles' optimizer.
        clip_grad_norm: max gradient norm of the main parameters (``None``: no clipping).
        seed: re-seeds torch's generator at every training step from ``(seed, step, rank)``,
            so the training noise of a resumed run is the noise of an uninterrupted one
            whatever else drew random numbers in between (``None``: leave the generator alone).
        compile: run the model's forward and the loss (and so their backward) through
            ``torch.compile`` in training, validation and test (:class:`CompiledForward`).
        compile_mode: ``torch.compile``'s mode, e.g. ``"reduce-overhead"`` (CUDA graphs) on a GPU.
    """

    def __init__(
        self,
        model: StreamLIC,
        lmbda: float = 0.0130,
        distortion: Literal["mse", "ms-ssim"] = "mse",
        learning_rate: float = 1e-4,
        aux_learning_rate: float = 1e-3,
        clip_grad_norm: float | None = 1.0,
        seed: int | None = None,
        quality: int | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        super().__init__()
        if distortion not in ("mse", "ms-ssim"):
            raise ValueError(f"module.distortion={distortion!r}: expected 'mse' or 'ms-ssim'")
        if quality is not None:
            lmbda = quality_lambda(quality, distortion)
        if lmbda <= 0:
            raise ValueError(f"module.lmbda={lmbda}: must be positive")
        self.automatic_optimization = False
        self.model = model
        self.schedule_position = SchedulePosition()  # the stage schedule callback moves it
        self.lmbda = lmbda
        self.quality = quality
        self.distortion = distortion
        self.learning_rate = learning_rate
        self.aux_learning_rate = aux_learning_rate
        self.clip_grad_norm = clip_grad_norm
        self.seed = seed
        self.compile_step = compile  # (not ``self.compile``: that is nn.Module.compile)
        self.compile_mode = compile_mode
        self.save_hyperparameters(ignore=["model"])
        self.forward_and_loss = CompiledForward(forward_and_loss, compile_mode) if compile else forward_and_loss
        self.train_metrics = RateDistortionMetrics()
        self.val_metrics = RateDistortionMetrics()
        self.test_metrics = RateDistortionMetrics()

    # ------------------------------------------------------------------ loss
    @property
    def group_lasso_active(self) -> bool:
        # the term pushes weight into the kept blocks *before* the masks are cut
        return self.model.sparsity_cfg.group_lasso > 0 and not self.model.masks_set

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        main, aux = [], []
        for name, parameter in self.model.named_parameters():
            (aux if name.endswith(AUX_PARAMETER_SUFFIX) else main).append(parameter)
        return [torch.optim.Adam(main, lr=self.learning_rate), torch.optim.Adam(aux, lr=self.aux_learning_rate)]

    def reset_optimizer_states(self) -> None:
        """Drop both optimizers' moments and step counts: a new stage trains other numerics (or other
        parameters) and starts as a fresh Adam would, so nothing of the previous stage carries over."""
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()

    def set_learning_rate(self, lr: float) -> None:
        """Learning rate of the main optimizer (the stage callback calls this every epoch)."""
        main_optimizer = self.trainer.optimizers[0]
        for group in main_optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        if self.seed is not None:
            torch.manual_seed(mixed_seed(self.seed, self.global_step, self.global_rank))
        x = batch
        out, terms, clamped = self.forward_and_loss(self.model, x, x, self.lmbda, self.distortion)
        loss = terms["loss"]
        if self.group_lasso_active:
            terms["group_lasso"] = self.model.regularization_loss()
            loss = loss + terms["group_lasso"]
        # The aux loss reaches only the quantiles and the RD loss never does, so one backward
        # pass serves both optimizers (and DDP sees exactly one backward per forward).
        aux_loss = self.model.aux_loss()
        main_optimizer, aux_optimizer = self.optimizers()
        main_optimizer.zero_grad()
        aux_optimizer.zero_grad()
        self.manual_backward(loss + aux_loss)
        if self.clip_grad_norm is not None:
            self.clip_gradients(main_optimizer, gradient_clip_val=self.clip_grad_norm, gradient_clip_algorithm="norm")
        main_optimizer.step()
        # the raw optimizer: trainer.global_step then counts batches, not batches x optimizers
        aux_optimizer.optimizer.step()

        metrics = self.train_metrics
        # A batch's MS-SSIM (5 scales of 11x11 Gaussian windows) costs about three times the tiny model's
        # whole training step on a CPU core (BENCHMARKS.md, bench/loader.py): it is measured on every
        # trainer.log_every_n_steps-th batch of an epoch, its first included, and train/ms_ssim is logged
        # per epoch only, the mean of those batches (every epoch has one; no step value goes stale between).
        measure_ms_ssim = batch_idx % self.trainer.log_every_n_steps == 0
        metrics(loss, terms["bpp"], out["x_hat"], x, clamped, with_ms_ssim=measure_ms_ssim)
        self.log_dict({f"train/{name}": metric for name, metric in metrics.items().items()
                       if name not in ("loss", "ms_ssim")}, on_step=True, on_epoch=True, batch_size=x.shape[0])
        if measure_ms_ssim:
            self.log("train/ms_ssim", metrics.ms_ssim, on_step=False, on_epoch=True, batch_size=x.shape[0])
        self.log("train/loss", metrics.loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        extras = {"train/mse": terms["mse"], "train/aux_loss": aux_loss.detach(),
                  "train/lr": main_optimizer.param_groups[0]["lr"],
                  "train/stage": float(STAGES.index(self.model.stage) + 1)}
        if "group_lasso" in terms:
            extras["train/group_lasso"] = terms["group_lasso"].detach()
        self.log_dict(extras, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss.detach()

    def _evaluate_batch(self, x: Tensor, metrics: RateDistortionMetrics) -> None:
        """Whole images (padded to a multiple of 64, cropped back; the rate counts the image pixels)."""
        out, terms, clamped = self.forward_and_loss(self.model, pad_to_multiple(x), x, self.lmbda, self.distortion)
        metrics(terms["loss"], terms["bpp"], out["x_hat"], x, clamped)

    def _evaluation_step(self, split: str, x: Tensor) -> None:
        metrics = getattr(self, f"{split}_metrics")
        self._evaluate_batch(x, metrics)
        self.log_dict({f"{split}/{name}": metric for name, metric in metrics.items().items()},
                      on_step=False, on_epoch=True, batch_size=x.shape[0], prog_bar=False)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluation_step("val", batch)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluation_step("test", batch)

    @torch.no_grad()
    def evaluate(self, dataloader) -> dict[str, float]:
        """bpp, PSNR, MS-SSIM, loss and clamped symbols of the current stage over ``dataloader``.

        Used by the stage report; runs outside Lightning's loops and restores the train/eval mode.
        """
        was_training = self.model.training
        self.model.eval()
        metrics = RateDistortionMetrics(sync_on_compute=False).to(self.device)
        try:
            for x in dataloader:
                self._evaluate_batch(x.to(self.device), metrics)
            return metrics.compute()
        finally:
            self.model.train(was_training)

    def setup(self, stage: str) -> None:
        # QAT emulates integer arithmetic: TF32 would change the integers on GPUs (docs/fixed-point.md)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
