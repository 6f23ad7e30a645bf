"""Helpers for the training tests: Hydra composition of tiny runs, train.py, probe callbacks.

The probe callbacks are instantiated by Hydra from the config (``+callbacks.probe=...``), so
they also work in ``train.py`` subprocesses (with this folder on ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
TESTS_DIR = Path(__file__).resolve().parent

# A tiny network on 64 px crops: 5 demo training photos, batch 2 -> 3 steps per epoch.
TINY = ["model=tiny", "data.patch_size=64", "data.batch_size=2", "data.repeat=1", "logger=csv",
        "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "export=false"]


def schedule(aun: int = 1, mask: int = 1, qat: int = 1, fix_encoder: int = 1, pdf: int = 1,
             aun_lr: float | None = None) -> list[str]:
    """Overrides for a schedule with the given number of epochs per stage."""
    lengths = {"aun": aun, "mask": mask, "qat": qat, "fix_encoder": fix_encoder, "pdf": pdf}
    overrides, start = [], 0
    for name, length in lengths.items():
        overrides.append(f"schedule.stages.{name}.start_epoch={start}")
        start += length
    overrides.append(f"schedule.max_epochs={start}")
    if aun_lr is not None:
        overrides.append(f"schedule.stages.aun.lr={aun_lr}")
    return overrides


def load_train_module():
    """``train.py`` (top level, not a package) as a module."""
    spec = importlib.util.spec_from_file_location("streamlic_train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_config(output_dir: Path, overrides: list[str]):
    """The config ``train.py`` would get for these overrides, writing into ``output_dir``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"paths.output_dir={output_dir}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_training(output_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """One in-process training run through train.train with a composed config."""
    return load_train_module().train(compose_config(output_dir, overrides))


def script_env() -> dict[str, str]:
    """Environment of ``train.py`` subprocesses: this folder importable (probe callbacks), one thread.

    One intra-op thread per process: the tiny model gains nothing from more, and OpenMP threads
    that wait for each other on a busy 2-core machine make every small op ten times slower.
    """
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
            "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def checkpoint_file(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def signal_mid_epoch(out: Path, args: list[str], steps_per_epoch: int, sig: signal.Signals = signal.SIGKILL,
                     timeout: float = 240, after_epochs: int = 1) -> tuple[subprocess.Popen, int]:
    """Start ``python train.py ARGS`` into ``out`` and send ``sig`` to its process group (as a terminal's
    Ctrl-C does; DDP ranks get it too) once ``last.ckpt`` is mid-epoch after ``after_epochs`` epochs.

    Returns the process (still running for a signal it handles; its stderr goes to ``out.stderr``)
    and the step ``last.ckpt`` held then.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".stderr"), "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={out}"], cwd=ROOT,
                                env=script_env(), stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)  # its own process group
    last, stopped_at = out / "checkpoints" / "last.ckpt", None
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                step = checkpoint_file(last)["global_step"] if last.is_file() else 0
            except Exception:  # noqa: BLE001 - a checkpoint being replaced right now
                step = 0
            if step > after_epochs * steps_per_epoch and step % steps_per_epoch:
                os.killpg(proc.pid, sig)
                stopped_at = step
                break
            time.sleep(0.05)
    finally:
        if stopped_at is None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert stopped_at is not None, "the run finished or stalled before it could be stopped mid-epoch"
    return proc, stopped_at


def run_killed_mid_epoch(out: Path, args: list[str], steps_per_epoch: int, timeout: float = 240,
                         after_epochs: int = 1) -> int:
    """:func:`signal_mid_epoch` with SIGKILL, waited for; returns the step it was killed at."""
    proc, killed_at = signal_mid_epoch(out, args, steps_per_epoch, signal.SIGKILL, timeout, after_epochs)
    proc.wait()
    assert not (out / "results.json").exists()
    return killed_at


def run_script(args: list[str], timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` (see :func:`script_env`)."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in model.state_dict().items()
            if isinstance(value, torch.Tensor)}


class StateProbe(Callback):
    """Records the model's tensors and stage at every epoch start (after the stage callback) and at the end.

    Writes ``rank<R>.pt`` into ``out_dir``: ``{"epochs": [(epoch, stage, tensors)], "end": (stage, tensors)}``.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.epochs: list[tuple[int, str, dict[str, torch.Tensor]]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append((trainer.current_epoch, pl_module.model.stage, model_tensors(pl_module.model)))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"epochs": self.epochs, "end": (pl_module.model.stage, model_tensors(pl_module.model)),
                    "world_size": trainer.world_size},
                   self.out_dir / f"rank{trainer.global_rank}.pt")


class BatchProbe(Callback):
    """Records which training crops each rank sees: ``(epoch, crop keys)`` per batch in ``rank<R>-batches.pt``.

    A crop's key is its bytes or those of its mirror image, whichever is smaller, so a crop
    flipped by the loader has the key of the stored one.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batches: list[tuple[int, list[bytes]]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.batches.append((trainer.current_epoch, [crop_key(crop) for crop in batch]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.batches, self.out_dir / f"rank{trainer.global_rank}-batches.pt")


def crop_key(crop: torch.Tensor) -> bytes:
    return min(crop.numpy().tobytes(), crop.flip(-1).numpy().tobytes())


class NaNInjector(Callback):
    """Makes the latent NaN in the forward pass of global step ``at_step`` (the weights stay finite)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step
        self.handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step and self.handle is None:
            self.handle = pl_module.model.g_a.register_forward_hook(lambda module, args, out: out * float("nan"))


def probe_overrides(out_dir: Path) -> list[str]:
    return ["+callbacks.probe._target_=_training.StateProbe", f"+callbacks.probe.out_dir={out_dir}"]


class _TwoParameters(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.always = torch.nn.Parameter(torch.ones(3))
        self.later = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.always * x).sum() + (self.later * x * x).sum()


def ddp_gradient_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo ranks: for plain and stage-aware DDP, wrap while ``later`` is frozen, unfreeze, backward.

    Saves ``{strategy: {parameter: grad}}`` to ``out_dir/rank<R>.pt``; the ranks see different inputs.
    """
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    from streamlic.distributed import StageAwareDDPStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    grads = {}
    try:
        for name, cls in (("plain", DDPStrategy), ("stage_aware", StageAwareDDPStrategy)):
            strategy = cls(parallel_devices=[torch.device("cpu")] * 2, find_unused_parameters=True)
            module = _TwoParameters()
            module.later.requires_grad_(False)  # e.g. the probability tables before stage 5
            wrapped = strategy._setup_model(module)
            module.later.requires_grad_(True)
            wrapped(torch.full((3,), float(rank + 1))).backward()
            grads[name] = {"always": module.always.grad, "later": module.later.grad}
        torch.save(grads, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
