"""Knowledge-retention methods, each a Lightning callback driven by the :class:`~hft_lightning.Curriculum`.

Add them to ``trainer.callbacks`` after the curriculum; they compose (for example Replay with EWC). A method of
your own subclasses :class:`RetentionCallback` (see docs/retention.md).
"""

from hft_lightning.retention.agem import AGEM
from hft_lightning.retention.base import RetentionCallback
from hft_lightning.retention.contracts import HasLoss, StageData
from hft_lightning.retention.ewc import EWC
from hft_lightning.retention.gem import GEM
from hft_lightning.retention.online_ewc import OnlineEWC
from hft_lightning.retention.parameters import match_names, on_parameters, trainable
from hft_lightning.retention.replay import Replay
from hft_lightning.retention.weight_averaging import WeightAveraging

__all__ = [
    "AGEM",
    "EWC",
    "GEM",
    "HasLoss",
    "OnlineEWC",
    "Replay",
    "RetentionCallback",
    "StageData",
    "WeightAveraging",
    "match_names",
    "on_parameters",
    "trainable",
]
