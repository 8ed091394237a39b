"""hft_lightning: Hierarchical Fine-Tuning of LLMs with PyTorch Lightning."""

from hft_lightning.callbacks import Report
from hft_lightning.curriculum import Curriculum
from hft_lightning.data.datamodule import StagedDataModule
from hft_lightning.data.source import AbilitySource
from hft_lightning.lora import LoRA
from hft_lightning.module import HFTModule
from hft_lightning.plan import Plan, Stage
from hft_lightning.progress import StageProgressBar

__all__ = [
    "AbilitySource",
    "Curriculum",
    "HFTModule",
    "LoRA",
    "Plan",
    "Report",
    "Stage",
    "StageProgressBar",
    "StagedDataModule",
]
