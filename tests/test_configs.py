"""Every Hydra config group composes and instantiates; bad values fail before training starts."""

from __future__ import annotations

import pickle

import lightning as L
import pytest
from hydra.utils import instantiate

from _training import CONF_DIR, TINY, compose_config, load_train_module
from callbacks import NonFiniteGuard, StageProgressBar, StageSchedule, parse_schedule
from streamlic.config import ConfigError
from streamlic.distributed import StageAwareDDPStrategy
from streamlic.lightning_module import CompiledForward, StreamLICModule, forward_and_loss
from streamlic.model import StreamLIC

GROUPS = {group: sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))
          for group in ("data", "model", "hardware", "sparsity", "schedule", "trainer", "logger", "callbacks")}


def test_every_group_named_in_the_design_exists():
    assert {"demo", "folder"} <= set(GROUPS["data"])
    assert {"w12a12", "w8a8"} <= set(GROUPS["hardware"])
    assert {"demo", "paper"} <= set(GROUPS["schedule"])
    assert {"cpu", "gpu", "ddp"} <= set(GROUPS["trainer"])
    assert {"wandb", "csv"} <= set(GROUPS["logger"])
    assert GROUPS["model"] and GROUPS["sparsity"]


def test_default_config_is_the_demo_run(tmp_path):
    cfg = compose_config(tmp_path, [])
    assert cfg.data.source == "demo" and cfg.trainer.accelerator == "cpu"
    assert cfg.logger.wandb.offline is True  # no account needed
    assert dict(cfg.model) == {"c1": 48, "c2": 96, "c3": 192, "M": 192, "N": 96}
    assert cfg.net.hardware.name == "w12a12" and cfg.init_from is None and cfg.ckpt_path is None
    assert cfg.trainer.max_epochs == cfg.schedule.max_epochs


@pytest.mark.parametrize("option", GROUPS["schedule"])
def test_schedules_list_the_five_stages_in_order(tmp_path, option):
    cfg = compose_config(tmp_path, [f"schedule={option}"])
    specs = parse_schedule(cfg.schedule.stages)
    assert specs[-1].start_epoch < cfg.schedule.max_epochs


@pytest.mark.parametrize("hardware", GROUPS["hardware"])
@pytest.mark.parametrize("sparsity", GROUPS["sparsity"])
def test_model_module_and_callbacks_instantiate(tmp_path, hardware, sparsity):
    cfg = compose_config(tmp_path, ["model=tiny", f"hardware={hardware}", f"sparsity={sparsity}"])
    model = load_train_module().build_model(cfg)
    assert isinstance(model, StreamLIC)
    assert model.hw.name == hardware and model.hw.activation_bits == cfg.hardware.activation_bits
    assert model.sparsity_cfg.group_lasso == cfg.sparsity.group_lasso
    module = instantiate(cfg.module, _partial_=True)(model=model)
    assert isinstance(module, StreamLICModule) and module.lmbda == cfg.module.lmbda
    callbacks = load_train_module().build_callbacks(cfg, "aun")
    kinds = {type(callback) for callback in callbacks}
    assert {StageSchedule, NonFiniteGuard, StageProgressBar} <= kinds


def test_module_compile_key_selects_the_compiled_path(tmp_path):
    """module.compile=true is the path tests/test_compile.py checks against eager; off by default."""
    model = load_train_module().build_model(compose_config(tmp_path, ["model=tiny"]))
    default = instantiate(compose_config(tmp_path, ["model=tiny"]).module, _partial_=True)(model=model)
    assert default.forward_and_loss is forward_and_loss
    cfg = compose_config(tmp_path, ["model=tiny", "module.compile=true", "module.compile_mode=reduce-overhead"])
    module = instantiate(cfg.module, _partial_=True)(model=model)
    assert isinstance(module.forward_and_loss, CompiledForward) and module.compile_mode == "reduce-overhead"
    # DDP's spawn start method pickles the module: the compiled functions are rebuilt, not pickled
    restored = pickle.loads(pickle.dumps(module))
    assert isinstance(restored.forward_and_loss, CompiledForward) and restored.compile_step is True


@pytest.mark.parametrize("logger", GROUPS["logger"])
def test_loggers_instantiate(tmp_path, logger):
    cfg = compose_config(tmp_path, [f"logger={logger}"])
    assert len(load_train_module().build_loggers(cfg)) == 1


@pytest.mark.parametrize("trainer", ["cpu", "ddp"])
def test_trainers_instantiate_on_this_machine(tmp_path, trainer):
    cfg = compose_config(tmp_path, [f"trainer={trainer}", "trainer.accelerator=cpu"])
    built = instantiate(cfg.trainer, _partial_=True)(logger=False, callbacks=[])
    assert isinstance(built, L.Trainer)
    if trainer == "ddp":
        assert isinstance(built.strategy, StageAwareDDPStrategy)


def test_gpu_trainer_keeps_float32(tmp_path):
    cfg = compose_config(tmp_path, ["trainer=gpu"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "32-true"


def test_folder_data_needs_its_folders(tmp_path):
    cfg = compose_config(tmp_path, ["data=folder", f"data.train_dir={tmp_path}", f"data.val_dir={tmp_path}",
                                    f"data.test_dir={tmp_path}"])
    assert instantiate(cfg.data).source == "folder"


def test_slurm_launcher_config_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the optional hydra-submitit-launcher")
    cfg = compose_config(tmp_path, ["hydra/launcher=slurm"])
    assert "SlurmLauncher" in cfg.hydra.launcher._target_


@pytest.mark.parametrize("override, key", [
    ("model.M=20", "model.M=20"),                       # not a multiple of the 12-channel blocks
    ("hardware.block_in=10", "hardware.block_in=10"),
    ("hardware.activation_bits=6", "hardware.activation_bits=6"),
    ("hardware.precision_bits=12", "hardware.precision_bits=12"),
    ("sparsity.density=1.5", "sparsity.density=1.5"),
    ("sparsity.density=0", "sparsity.density=0"),
    ("+sparsity.layers.ctx9=0.5", "sparsity.layers.ctx9"),
    ("schedule.stages.qat.start_epoch=1", "schedule.stages.qat.start_epoch=1"),
    ("schedule.stages.mask.lr=-1", "schedule.stages.mask.lr=-1"),
])
def test_config_breaking_a_constraint_fails_before_training(tmp_path, override, key):
    out = tmp_path / "run"
    cfg = compose_config(out, [*TINY, override])
    with pytest.raises(ConfigError) as error:
        load_train_module().train(cfg)
    assert key in str(error.value)
    assert not out.exists()  # nothing was written: no trainer, no logger, no checkpoint


def test_ddp_popen_inside_a_local_multirun_is_refused(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, read_write

    cfg = compose_config(tmp_path, [*TINY, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"])
    with read_write(cfg.hydra):
        OmegaConf.update(cfg, "hydra.mode", RunMode.MULTIRUN)
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(ConfigError, match="trainer.strategy.*multirun"):
        load_train_module().train(cfg)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("name", ["w12a12", "w8a8"])
def test_hardware_constants_are_the_hardware_config_group(name):
    """HardwareConfig's defaults and W8A8 restate conf/hardware/*.yaml: they stay equal."""
    from omegaconf import OmegaConf

    from streamlic import W8A8, W12A12
    from streamlic.config import HardwareConfig

    constant = {"w12a12": W12A12, "w8a8": W8A8}[name]
    assert HardwareConfig(**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "hardware" / f"{name}.yaml"))) == constant
    assert (HardwareConfig() == constant) == (name == "w12a12")


def test_experiment_and_debug_groups_compose(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=tiny_w8a8"])
    assert cfg.hardware.name == "w8a8" and cfg.model.M == 24 and cfg.ema_decay == 0.99
    assert cfg.sparsity.density == 0.5 and cfg.trainer.max_epochs == 30
    cfg = compose_config(tmp_path, ["debug=fast"])
    starts = [cfg.schedule.stages[name].start_epoch for name in ("aun", "mask", "qat", "fix_encoder", "pdf")]
    assert starts == [0, 1, 2, 3, 4] and cfg.trainer.max_epochs == 5 and cfg.trainer.limit_train_batches == 1


@pytest.mark.slow
def test_debug_fast_runs_one_batch_through_all_five_stages(tmp_path):
    result = load_train_module().train(compose_config(tmp_path, ["debug=fast"]))
    assert result["status"] == "finished" and result["stage"] == "pdf"
    assert [row["stage"] for row in result["stage_report"]] == ["aun", "mask", "qat", "fix_encoder", "pdf"]
    assert (tmp_path / "export" / "manifest.json").is_file()
