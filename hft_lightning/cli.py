"""``python -m hft_lightning``: the LightningCLI of a Hierarchical Fine-Tuning run.

The embedded default is the constructors' defaults plus :func:`trainer_defaults`: with no argument,
``fit`` trains the tiny LLaMA-style model on the built-in abilities through the default curriculum, protected by
:data:`RECOMMENDED_RETENTION`.
``configs/default.yaml`` spells the same run out (a test checks that they agree).
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
from dataclasses import asdict
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from hft_lightning.callbacks import Report
from hft_lightning.curriculum import Curriculum
from hft_lightning.data.datamodule import StagedDataModule
from hft_lightning.errors import ConfigError, find_config_error
from hft_lightning.module import HFTModule, check_checkpoint_format
from hft_lightning.plan import DEFAULT_STAGES

DEFAULT_ROOT_DIR = "runs/hft"
RECOMMENDED_RETENTION = [
    {"class_path": "hft_lightning.retention.Replay", "init_args": {"memory_size": 256, "ratio": 0.25}},
    {"class_path": "hft_lightning.retention.WeightAveraging", "init_args": {"alphas": [0.25, 0.5, 0.75, 1.0]}},
]
"""The retention of the embedded default: the recipe chosen on validation seeds (benchmarks/LOG.md, 2026-12-05)."""


def default_logger() -> dict[str, Any]:
    """wandb, offline, when it is installed (``WANDB_MODE`` still overrides); a CSV logger otherwise."""
    if importlib.util.find_spec("wandb") is not None:
        return {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"project": "hft_lightning", "save_dir": DEFAULT_ROOT_DIR, "offline": True},
        }
    return {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": DEFAULT_ROOT_DIR}}


def trainer_defaults() -> dict[str, Any]:
    """Trainer settings of the embedded default run."""
    return {
        "default_root_dir": DEFAULT_ROOT_DIR,
        "logger": default_logger(),
        "num_sanity_val_steps": 0,
        "gradient_clip_val": 1.0,
        "log_every_n_steps": 10,
    }


class SaveRunConfig(SaveConfigCallback):
    """Saves each subcommand's config to its own file in the log directory, replacing an older one.

    ``fit`` writes ``config.yaml`` (a resumed fit in the same directory rewrites it), ``validate`` and ``test``
    write ``config_validate.yaml`` and ``config_test.yaml``, so evaluating a checkpoint never clobbers the
    configuration of the run that trained it.
    """

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            self.config_filename = f"config_{TrainerFn(stage).value}.yaml"  # the enum's str() differs across Pythons
        super().setup(trainer, pl_module, stage)


class HFTCLI(LightningCLI):
    """LightningCLI with the model's checkpoint and the data's tokenizer linked, and the plan checked before any run.

    ``fit --plan_only=true`` decides the curriculum's order (measuring the model if the planner does), prints the
    plan and saves ``report/plan.json``, and trains nothing. With ``--ckpt_path`` it prints the plan the checkpoint
    holds (the one a resumed run follows) and writes nothing.
    """

    def _check_plan(self) -> None:
        if self.subcommand != "fit" and self.config[self.subcommand].plan_only:
            raise ConfigError(f"--plan_only applies to fit only, not to {self.subcommand}")
        Curriculum.of(self.trainer).check_abilities(self.datamodule.ability_names, self.datamodule.evaluated_only)

    before_fit = before_validate = before_test = _check_plan

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with the :class:`~hft_lightning.callbacks.Report` this command line adds to every run.

        Raises:
            ConfigError: Naming ``trainer.callbacks``, if it lists a Report too (Lightning allows one).
        """
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        listed = config.trainer.callbacks
        if any(isinstance(c, Report) for c in (listed if isinstance(listed, list) else [listed])):
            raise ConfigError(
                "trainer.callbacks lists hft_lightning.Report, which the command line adds itself after "
                "trainer.callbacks: remove it from trainer.callbacks"
            )
        return super().instantiate_trainer(**kwargs)

    @override
    def before_instantiate_classes(self) -> None:
        # The default logger writes beside the report and the model, under trainer.default_root_dir, unless its
        # save_dir was set to another folder.
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger, root = config.trainer.logger, config.trainer.default_root_dir
        if isinstance(logger, Namespace) and logger.init_args.get("save_dir") == DEFAULT_ROOT_DIR and root is not None:
            logger.init_args.save_dir = root

    def fit(self, model: HFTModule, datamodule: StagedDataModule, **kwargs: Any) -> None:
        """Runs ``trainer.fit``, or with ``--plan_only=true`` only plans: prints the plan and saves plan.json."""
        if not self.config.fit.plan_only:
            self.trainer.fit(model, datamodule=datamodule, **kwargs)
            return
        curriculum = Curriculum.of(self.trainer)
        ckpt_path = kwargs.get("ckpt_path")
        if ckpt_path is not None:
            curriculum.load_state_dict(_curriculum_state(ckpt_path, curriculum))
            print(curriculum.plan.table())
            print(f"The plan of {ckpt_path}, which a resumed run follows; nothing was trained or written.")
            return
        device = self.trainer.strategy.root_device
        plan = curriculum.decide(model.to(device), datamodule, self.trainer.precision_plugin.train_step_context)
        print(plan.table())
        print(f"Plan saved to {curriculum.save_plan(self.trainer.default_root_dir)}; nothing was trained.")

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--plan_only",
            type=bool,
            default=False,
            help="fit only: decide, print and save the curriculum's plan (report/plan.json) without training; with "
            "--ckpt_path=FILE, print the plan that checkpoint resumes with",
        )
        # Every fit writes its report: the callback is added after trainer.callbacks, whatever the config lists.
        parser.add_lightning_class_args(Report, "report")
        # One field names the model: the data module loads the same checkpoint's tokenizer.
        parser.link_arguments("model.name_or_path", "data.tokenizer_name_or_path", apply_on="parse")
        parser.link_arguments("data.tokenizer", "model.tokenizer", apply_on="instantiate")
        stages = [asdict(s) for s in DEFAULT_STAGES]
        curriculum = {"class_path": "hft_lightning.Curriculum", "init_args": {"stages": stages}}
        progress = {"class_path": "hft_lightning.StageProgressBar"}
        parser.set_defaults({"trainer.callbacks": [curriculum, progress, *RECOMMENDED_RETENTION]})


def _curriculum_state(ckpt_path: str, curriculum: Curriculum) -> dict[str, Any]:
    """The curriculum's state in a checkpoint file, read without loading its tensors into memory.

    Raises:
        ConfigError: Naming ``--ckpt_path``, if the file cannot be read, is in another format or has no curriculum.
    """
    if str(ckpt_path) in ("last", "best", "hpc", "registry"):
        raise ConfigError(f"--ckpt_path={ckpt_path} with --plan_only: give the checkpoint file's path")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise ConfigError(f"--ckpt_path: cannot read a checkpoint from {ckpt_path!r}: {error}") from None
    check_checkpoint_format(checkpoint)
    state = checkpoint.get("callbacks", {}).get(curriculum.state_key)
    if state is None:
        raise ConfigError(f"--ckpt_path: {ckpt_path!r} holds no {curriculum.state_key} state")
    return state


def main(args: list[str] | None = None, run: bool = True) -> HFTCLI:
    """Entry point of ``python -m hft_lightning``.

    A :class:`~hft_lightning.errors.ConfigError` anywhere in the run (the configuration, the data, the plan)
    is printed as one line on stderr and exits with status 2; anything else propagates with its traceback.
    """
    try:
        return HFTCLI(
            HFTModule,
            StagedDataModule,
            trainer_defaults=trainer_defaults(),
            seed_everything_default=0,
            save_config_callback=SaveRunConfig,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    except Exception as error:
        config_error = find_config_error(error)
        if config_error is None:
            raise
        print(f"hft_lightning: error: {config_error}", file=sys.stderr)
        raise SystemExit(2) from None
