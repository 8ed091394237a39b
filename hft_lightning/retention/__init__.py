"""Knowledge-retention methods, each a Lightning callback driven by the :class:`~hft_lightning.Curriculum`.

Add them to ``trainer.callbacks`` after the curriculum; they compose (for example Replay with EWC, or KLAnchor's
loss term with EWC's gradient edit). A method of your own subclasses :class:`RetentionCallback` (see
docs/retention.md). :class:`ForgettingBudget` watches every trained ability during training and acts on the
retention callbacks when one falls out of its budget.
"""

from hft_lightning.retention.agem import AGEM
from hft_lightning.retention.base import RetentionCallback
from hft_lightning.retention.contracts import HasCausalLM, HasLoss, LossTerm, StageData, TakesLossTerms
from hft_lightning.retention.ewc import EWC
from hft_lightning.retention.forgetting_budget import ForgettingBudget
from hft_lightning.retention.gem import GEM
from hft_lightning.retention.kl_anchor import KLAnchor
from hft_lightning.retention.online_ewc import OnlineEWC
from hft_lightning.retention.parameters import match_names, on_parameters, trainable
from hft_lightning.retention.replay import Replay
from hft_lightning.retention.weight_averaging import WeightAveraging

__all__ = [
    "AGEM",
    "EWC",
    "GEM",
    "ForgettingBudget",
    "HasCausalLM",
    "HasLoss",
    "KLAnchor",
    "LossTerm",
    "OnlineEWC",
    "Replay",
    "RetentionCallback",
    "StageData",
    "TakesLossTerms",
    "WeightAveraging",
    "match_names",
    "on_parameters",
    "trainable",
]
