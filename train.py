"""Train StreamLIC through its five stages (Hydra entry point; configs in ``conf/``).

    python train.py                                   # all five stages on the demo photos
    python train.py ckpt_path=<run>/checkpoints/last.ckpt   # resume a run exactly
    python train.py -m init_from=<run>/checkpoints/stage1-aun.ckpt sparsity.density=0.1,0.2,0.3

A run writes into its Hydra output directory: ``checkpoints/`` (stage checkpoints and
``last.ckpt``), ``stage_report.json``, ``results.json``, the logger's files and ``export/``.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from callbacks import STAGE_CHECKPOINT_NAMES, NonFiniteLossError, StageSchedule, parse_schedule, read_finished_stages
from streamlic.config import ConfigError
from streamlic.export import export_package
from streamlic.model import STAGES, StreamLIC
from streamlic.sweep import context_macs_per_pixel, write_results

log = logging.getLogger("streamlic.train")

# The step checkpoints hold the state after the optimizer step, which is what a resume needs;
# Lightning warns about that for every manual-optimization module.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def _instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """Hydra's instantiate, re-raising a ConfigError from the target itself (it names the key)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def build_model(cfg: DictConfig) -> StreamLIC:
    """The network of ``cfg.net``; every hardware/model/sparsity constraint is checked here."""
    return _instantiate(cfg.net, _convert_="all")


def load_init_checkpoint(model: StreamLIC, path: str | Path) -> str:
    """Load weights and stage from a stage checkpoint; returns the stage the new run starts in.

    Nothing is recomputed: masks, frozen scales and tables come from the checkpoint. Its
    masks were cut for its own sparsity config, so a different one is an error here.
    """
    path = Path(path)
    state = StreamLIC.checkpoint_state_dict(path)
    saved = state["_extra_state"]
    if saved["flags"]["masks_set"] and saved["config"]["sparsity"] != model.sparsity_cfg.to_dict():
        raise ConfigError(
            f"sparsity={model.sparsity_cfg.to_dict()}: init_from={path} already has masks cut for "
            f"sparsity={saved['config']['sparsity']}; start from a stage-1 checkpoint "
            f"({STAGE_CHECKPOINT_NAMES['aun']}) to train other densities"
        )
    model.load_state_dict(state)
    finished = read_finished_stages(torch.load(path, map_location="cpu", weights_only=False))
    if finished is not None and model.stage not in finished:
        log.warning("init_from=%s: stage %s had not finished in that run; continuing with the next stage anyway",
                    path, model.stage)
    index = STAGES.index(model.stage)
    if index + 1 == len(STAGES):
        raise ConfigError(f"init_from={path}: the checkpoint is in the last stage ({model.stage}); nothing is left "
                          "to train")
    log.info("init_from %s: model in stage %s; this run starts at stage %s", path, model.stage, STAGES[index + 1])
    return STAGES[index + 1]


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
    """The hardware package of a QAT-or-later model (DESIGN §6), golden vectors on the first test image.

    An export that fails (a number out of its hardware range) is reported, not raised: the
    trained checkpoints stay usable and ``streamlic export`` can be rerun on them.
    """
    if not model.scales_frozen:
        log.warning("export skipped: the model is in stage %s; exports need stage 3 (qat) or later", model.stage)
        return {"dir": None, "error": f"model in stage {model.stage}"}
    test_set = datamodule.test_dataset
    image, name = (test_set[0], test_set.names[0]) if test_set is not None else (None, None)
    try:
        export_package(model.cpu(), out_dir, image=image, image_name=name)
    except (ValueError, ArithmeticError) as err:
        log.error("export failed (the checkpoints are kept; fix and rerun `streamlic export`): %s", err)
        return {"dir": None, "error": str(err)}
    log.info("hardware package written to %s", out_dir)
    return {"dir": str(out_dir), "error": None}


def train(cfg: DictConfig) -> dict[str, Any]:
    """One training run; returns (and writes to ``results.json``) its results."""
    parse_schedule(cfg.schedule.stages)  # schedule and launcher errors before anything is built
    check_launcher(cfg)
    L.seed_everything(cfg.seed, workers=True)
    model = build_model(cfg)
    start_stage = load_init_checkpoint(model, cfg.init_from) if cfg.init_from else STAGES[0]
    datamodule = _instantiate(cfg.data)
    # partial, then call: objects passed to instantiate() itself would be copied into the config
    module = _instantiate(cfg.module, _partial_=True)(model=model)
    callbacks = build_callbacks(cfg, start_stage)
    loggers = build_loggers(cfg)
    trainer: L.Trainer = _instantiate(cfg.trainer, _partial_=True)(callbacks=callbacks, logger=loggers or False)
    output_dir = Path(cfg.paths.output_dir)
    results: dict[str, Any] = {"overrides": job_overrides(), "output_dir": str(output_dir),
                               "init_from": cfg.init_from, "status": "finished"}
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        except NonFiniteLossError as err:
            log.error("%s", err)
            results.update(status="stopped: non-finite loss", message=str(err))
        if results["status"] == "finished" and cfg.test:
            tested = trainer.test(module, datamodule=datamodule, verbose=trainer.is_global_zero)
            results["test"] = _split_metrics(tested[0], "test/") if tested else None
        if trainer.is_global_zero:
            stages = next((cb for cb in callbacks if isinstance(cb, StageSchedule)), None)
            rows = stages.rows() if stages else []
            finished_rows = [row for row in rows if row.get("end")]
            results.update(
                stage=model.stage,
                stage_report=rows,
                val=finished_rows[-1]["end"] if finished_rows else None,
                checkpoints={row["stage"]: row["checkpoint"] for row in finished_rows},
                context_macs_per_pixel=context_macs_per_pixel(model),
                sparsity=model.sparsity_cfg.to_dict(),
                hardware=model.hw.name,
            )
            if results["status"] == "finished" and cfg.export:
                results["export"] = export_model(model, Path(cfg.paths.export_dir), datamodule)
            write_results(output_dir, results)
    finally:
        if trainer.is_global_zero and any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            wandb.finish()  # one wandb run per (multirun) job
    return results


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    results = train(cfg)
    if results["status"] != "finished" and HydraConfig.get().mode != RunMode.MULTIRUN:
        sys.exit(1)  # in a sweep the other jobs go on; the summary shows the status


if __name__ == "__main__":
    main()
