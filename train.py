"""Train StreamLIC through its five stages (Hydra entry point; configs in ``conf/``).

    python train.py                                   # all five stages on the demo photos
    python train.py ckpt_path=<run>/checkpoints/last.ckpt   # resume a run exactly
    python train.py -m init_from=<run>/checkpoints/stage1-aun.ckpt sparsity.density=0.1,0.2,0.3

A run writes into its Hydra output directory: ``checkpoints/`` (stage checkpoints and
``last.ckpt``), ``stage_report.json``, ``results.json``, the logger's files and ``export/``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from streamlic.config import ConfigError
from streamlic.runs import (CheckpointError, check_config, check_hardware, discard_unstarted_run, init_from_config,
                            is_user_error, load_checkpoint, model_state, plain, resume_arguments, resume_config)

if TYPE_CHECKING:
    import lightning as L

    from streamlic.model import StreamLIC

log = logging.getLogger("streamlic.train")


def quiet_dependencies() -> None:
    """Filter warnings of dependencies that say nothing a StreamLIC user can act on."""
    # the step checkpoints hold the state after the optimizer step, which is what a resume needs
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"The '\w+_dataloader' does not have many workers")
    warnings.filterwarnings("ignore", message=r".*does not have many workers which may be a bottleneck")
    # Lightning's own use of a torch API that torch has deprecated
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # a mid-epoch checkpoint resumes exactly: the seeded training loader skips the batches already trained
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    os.environ.setdefault("WANDB_SILENT", "true")
    # Lightning's advertisement of its cloud logger on every run
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡 Tip"))


def _instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """Hydra's instantiate, re-raising a ConfigError from the target itself (it names the key)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """Lightning's Trainer of ``cfg.trainer``; settings this machine cannot run (``trainer=gpu`` without a GPU,
    more devices than it has) are a ConfigError naming them, before anything is trained."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return _instantiate(cfg.trainer, _partial_=True)(callbacks=callbacks, logger=loggers or False)
    except MisconfigurationException as err:
        raise ConfigError(f"trainer.accelerator={cfg.trainer.get('accelerator')}, trainer.devices="
                          f"{cfg.trainer.get('devices')}: {err} (trainer=cpu trains on the CPU)") from None


def build_model(cfg: DictConfig) -> StreamLIC:
    """The network of ``cfg.net``; every hardware/model/sparsity constraint is checked here."""
    return _instantiate(cfg.net, _convert_="all")


def load_init_checkpoint(model: StreamLIC, checkpoint: dict[str, Any], path: str) -> str:
    """Load weights and stage from a stage checkpoint; returns the stage the new run starts in.

    Nothing is recomputed: masks, frozen scales and tables come from the checkpoint (whose
    fit with the config :func:`streamlic.runs.init_from_config` has checked).
    """
    from callbacks import read_finished_stages
    from streamlic.stage import STAGES

    model.load_state_dict(model_state(checkpoint, path))
    finished = read_finished_stages(checkpoint)
    if finished is not None and model.stage not in finished:
        log.warning("init_from=%s: stage %s had not finished in that run; continuing with the next stage anyway",
                    path, model.stage)
    next_stage = STAGES[STAGES.index(model.stage) + 1]
    log.info("init_from %s: model in stage %s; this run starts at stage %s", path, model.stage, next_stage)
    return next_stage


def check_launcher(cfg: DictConfig) -> None:
    """Refuse DDP with Lightning's popen launcher inside a local multirun.

    That launcher starts each extra rank by re-running the command line, which inside a
    multirun would start the whole sweep again in every rank.
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    if not HydraConfig.get().launcher._target_.endswith("BasicLauncher") or cfg.trainer.get("devices") == 1:
        return
    strategy = cfg.trainer.get("strategy")
    start_method = strategy.get("start_method", "popen") if isinstance(strategy, DictConfig) else str(strategy)
    if start_method in ("popen", "ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false"):
        raise ConfigError(
            "trainer.strategy: DDP with start_method=popen cannot run inside a local multirun (every rank would "
            "restart the sweep); sweep with the SLURM launcher (hydra/launcher=slurm) or run the DDP jobs one by one"
        )


def build_callbacks(cfg: DictConfig, start_stage: str) -> list[L.Callback]:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        extra = {"start_stage": start_stage} if OmegaConf.select(node, "_target_").endswith("StageSchedule") else {}
        callbacks.append(_instantiate(node, **extra))
        log.debug("callback %s: %s", name, type(callbacks[-1]).__name__)
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    return [_instantiate(node) for node in (cfg.get("logger") or {}).values() if node is not None]


def job_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _split_metrics(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {key[len(prefix):]: float(value) for key, value in metrics.items() if key.startswith(prefix)}


def export_model(model: StreamLIC, out_dir: Path, datamodule) -> dict[str, Any]:
    """The hardware package of a QAT-or-later model (docs/export-format.md), golden vectors on the first test image.

    A model before QAT has nothing to export (reported, not an error). An export that fails is
    returned as an error: the run then ends as failed, with its checkpoints kept.
    """
    if not model.scales_frozen:
        log.warning("export skipped: the model is in stage %s; exports need stage 3 (qat) or later", model.stage)
        return {"dir": None, "error": None, "skipped": f"model in stage {model.stage}"}
    from streamlic.export import export_package

    test_set = datamodule.test_dataset
    image, name = (test_set[0], test_set.names[0]) if test_set is not None else (None, None)
    try:
        export_package(model.cpu(), out_dir, image=image, image_name=name, force=True)
    except (ValueError, ArithmeticError) as err:
        return {"dir": None, "error": str(err)}
    log.info("hardware package written to %s", out_dir)
    return {"dir": str(out_dir), "error": None}


def starting_point(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, list, dict | None, int | None]:
    """Where the run starts: its config, its invocations, an ``init_from`` checkpoint and, for a resumed run,
    the schedule epochs it has already trained.

    With ``ckpt_path`` the config is the one stored in the checkpoint
    (:func:`streamlic.runs.resume_config`) and the new invocation is appended to the run's record;
    with ``init_from`` what the checkpoint fixes comes from it (:func:`streamlic.runs.init_from_config`).
    """
    from callbacks import invocation, read_run_record, schedule_epochs_done

    invocations = [invocation(overrides, cfg.ckpt_path)]
    if not cfg.ckpt_path:
        init_checkpoint = load_checkpoint(cfg.init_from, "init_from") if cfg.init_from else None
        if init_checkpoint is not None:
            cfg = init_from_config(cfg, init_checkpoint, overrides)
        return plain(cfg), invocations, init_checkpoint, None
    checkpoint = load_checkpoint(cfg.ckpt_path, "ckpt_path")
    record = read_run_record(checkpoint)
    if record is None:
        log.warning("ckpt_path=%s holds no stored config (a checkpoint of an older release): the run resumes "
                    "with the config of this command line", cfg.ckpt_path)
        cfg = plain(cfg)
    else:
        cfg = resume_config(cfg, record, overrides)
        invocations = [*record["invocations"], *invocations]
        log.info("resuming with the run's stored config (invocation %d of this run)", len(invocations))
    return cfg, invocations, None, schedule_epochs_done(checkpoint)


def stage_results(model: StreamLIC, callbacks: list) -> dict[str, Any]:
    """What ``results.json`` says of the model and its stages: the stage report, the last validation
    point, the stage checkpoints, the context MACs, sparsity and hardware."""
    from callbacks import StageSchedule
    from streamlic.sweep import context_macs_per_pixel

    stages = next((cb for cb in callbacks if isinstance(cb, StageSchedule)), None)
    rows = stages.rows() if stages else []
    finished_rows = [row for row in rows if row.get("end")]
    return dict(
        stage=model.stage,
        stage_report=rows,
        val=finished_rows[-1]["end"] if finished_rows else None,
        checkpoints={row["stage"]: row["checkpoint"] for row in finished_rows},
        context_macs_per_pixel=context_macs_per_pixel(model),
        sparsity=model.sparsity_cfg.to_dict(),
        hardware=model.hw.name,
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """One training run from its starting point (:func:`starting_point`); returns (and writes to
    ``results.json``) its results."""
    check_config(cfg)  # before the imports below: a mistyped value is one line within a second or two
    quiet_dependencies()
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    from callbacks import NonFiniteLossError, RunInterrupted, RunRecord, parse_schedule
    from streamlic.stage import STAGES
    from streamlic.sweep import write_results
    from streamlic.threads import apply_thread_policy

    overrides = job_overrides()
    cfg, invocations, init_checkpoint, epochs_done = starting_point(cfg, overrides)
    max_epochs = cfg.trainer.get("max_epochs")
    if epochs_done is not None and max_epochs is not None and 0 <= max_epochs <= epochs_done:
        return already_finished(cfg, epochs_done)
    if cfg.init_from or cfg.ckpt_path:  # check_config could not: the model and widths are the checkpoint's
        check_hardware(cfg)
    parse_schedule(cfg.schedule.stages)  # schedule and launcher errors before anything is built
    check_launcher(cfg)
    apply_thread_policy(cfg.get("threads"))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg)
    # a resumed run's stage callback restores its own start stage and epoch offset from the checkpoint
    start_stage = load_init_checkpoint(model, init_checkpoint, cfg.init_from) if init_checkpoint else STAGES[0]
    datamodule = _instantiate(cfg.data)
    # data errors before a logger or an output file exists
    datamodule.setup("fit")
    if cfg.test:
        datamodule.setup("test")
    # partial, then call: objects passed to instantiate() itself would be copied into the config
    module = _instantiate(cfg.module, _partial_=True)(model=model)
    callbacks = [*build_callbacks(cfg, start_stage), RunRecord(OmegaConf.to_container(cfg), invocations)]
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, callbacks, loggers)
    output_dir = Path(cfg.paths.output_dir)
    results: dict[str, Any] = {"overrides": overrides, "output_dir": str(output_dir), "init_from": cfg.init_from,
                               "status": "finished", "invocations": invocations}
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        except NonFiniteLossError as err:
            log.error("%s", err)
            results.update(status="stopped: non-finite loss", message=str(err))
        except RunInterrupted as stop:
            log.warning("run interrupted: %s; %s holds that step", stop, stop.checkpoint)
            results.update(status="interrupted", interrupted=stop.as_dict(), message=str(stop))
        if results["status"] == "finished" and cfg.test:
            tested = trainer.test(module, datamodule=datamodule, verbose=trainer.is_global_zero)
            results["test"] = _split_metrics(tested[0], "test/") if tested else None
        if trainer.is_global_zero:
            results.update(stage_results(model, callbacks))
            if results["status"] == "finished" and cfg.export:
                results["export"] = export_model(model, Path(cfg.paths.export_dir), datamodule)
                if results["export"]["error"]:
                    results.update(status="failed: export", message=results["export"]["error"])
                    log.error("export failed (the checkpoints are kept): %s", results["export"]["error"])
            write_results(output_dir, results)
    finally:
        if trainer.is_global_zero and any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            wandb.finish()  # one wandb run per (multirun) job
    return results


def already_finished(cfg: DictConfig, epochs_done: int) -> dict[str, Any]:
    """A resume of a run that has trained all its epochs: nothing runs and nothing is overwritten."""
    from streamlic.sweep import RESULTS_FILE

    path = Path(cfg.paths.output_dir) / RESULTS_FILE
    results = json.loads(path.read_text()) if path.is_file() else {"status": "finished"}
    message = (f"ckpt_path={cfg.ckpt_path}: the run has already trained its {epochs_done} epochs "
               f"(trainer.max_epochs={cfg.trainer.max_epochs}); nothing to do (a larger trainer.max_epochs "
               "lengthens it)")
    log.info("%s", message)
    return {**results, "already_finished": message}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        results = train(cfg)
    except Exception as err:
        if not is_user_error(err) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if not multirun:
            discard_unstarted_run(Path(hydra_cfg.runtime.output_dir), bool(cfg.ckpt_path), hydra_cfg.output_subdir,
                                  f"{hydra_cfg.job.name}.log")
        print(f"ERROR {err}", file=sys.stderr)
        sys.exit(1)
    if "already_finished" in results:
        print(results["already_finished"], file=sys.stderr)
    elif results["status"] == "interrupted":
        stop = results["interrupted"]
        print(f"INTERRUPTED ({stop['signal']}) at stage {stop['stage']}, epoch {stop['epoch']}, step {stop['step']}; "
              f"resume with: python {shlex.quote(sys.argv[0])} ckpt_path={shlex.quote(stop['checkpoint'])}",
              file=sys.stderr)
        if multirun:  # the sweep stops here, with the summary of its jobs so far
            from streamlic.sweep import write_summary

            summary = hydra_cfg.callbacks.get("sweep_summary") or {}
            write_summary(hydra_cfg.sweep.dir, reference=summary.get("reference"))
        sys.exit(130)
    elif results["status"] != "finished" and not multirun:
        print(f"ERROR run {results['status']}: {results.get('message', '')}", file=sys.stderr)
        sys.exit(1)  # in a sweep the other jobs go on; the summary shows the status and fails the sweep


if __name__ == "__main__":
    try:
        if any(arg.startswith("ckpt_path=") for arg in sys.argv[1:]):
            quiet_dependencies()  # before the import below loads compressai and Lightning
            from callbacks import read_run_record

            sys.argv[1:] = resume_arguments(sys.argv[1:], read_run_record)
    except CheckpointError as error:
        print(f"ERROR {error}", file=sys.stderr)
        sys.exit(1)
    main()
