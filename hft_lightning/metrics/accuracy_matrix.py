"""The continual-learning accuracy matrix and the numbers derived from it.

One validation run scores every ability, whatever stage is training; this metric keeps those scores as rows of
R, a ``[num_stages + 1, num_abilities]`` fp32 tensor: row 0 is the model before training, row ``i + 1`` the model
after stage ``i``. A row is written whole and a later write replaces it, so the last validation of a stage (the
one at its boundary) is the one that counts. Rows not yet recorded are NaN, which is how ``compute()`` knows how
far the curriculum has got: the "final" row is the last recorded stage row, so the derived numbers are
meaningful mid-run as well as at the end.

The :class:`~hft_lightning.callbacks.Report` callback owns the metric and saves its matrix in the callback's own
checkpoint state (``Report.state_dict``), so a checkpoint carries the matrix and a resumed run keeps the rows of the
stages it has already finished.

Under DDP every rank is expected to pass the same, already globally reduced, scores (the per-ability scorers sync
themselves). The state is reduced with ``"max"`` over ranks: exact for identical inputs, where ``"mean"`` of n
identical floats can round in the last bit, and a row that no rank has recorded stays NaN.

Do not hand the metric object itself to ``self.log``: Lightning would ``reset()`` it at the end of the epoch and
erase the rows of earlier stages. Log the values of ``compute()`` instead.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class AccuracyMatrix(Metric):
    r"""Accuracy matrix R[i][j] of a staged curriculum, with average accuracy, forgetting, BWT and FWT.

    ``R[i][j]`` is the score in [0, 1] on ability ``j`` after stage ``i``; ``before[j]`` is the score before any
    training. With ``T`` the last recorded stage row and ``L_j = learned_at[j]`` the first stage that trains
    ability ``j``, :meth:`compute` returns

    - ``average_accuracy`` = mean_j R[T][j];
    - ``forgetting[j]`` = max_{l < T} R[l][j] - R[T][j] over the earlier recorded *stage* rows (Chaudhry et al.
      2018, "Riemannian Walk for Incremental Learning"). It is not clamped at 0: a negative value says the
      ability is at its best now. It is 0 when no earlier stage row exists (T == 0);
    - ``bwt`` = mean_{j : L_j < T} (R[T][j] - R[L_j][j]), backward transfer (Lopez-Paz & Ranzato 2017, "Gradient
      Episodic Memory"), generalised from "task j is stage j" to "ability j is first trained in stage L_j";
    - ``fwt`` = mean_{j : 0 < L_j <= T} (R[L_j - 1][j] - before[j]), forward transfer: what the stages before
      ``L_j`` did for ability ``j`` before it was trained, measured against the untrained model.

    Abilities no stage trains (``learned_at[j] is None``) count in the average and in forgetting but not in BWT
    or FWT. A BWT or FWT term that needs a row that was never recorded (a stage that ended without validation, or
    no "before" row) is left out of its mean, and a mean over no term is 0.0, so the numbers are never NaN.
    :meth:`compute` raises ``RuntimeError`` until at least one stage row is recorded: the "before" row alone
    defines none of these numbers.

    Args:
        abilities: Ability names, one per column of R.
        num_stages: Number of stages in the plan, the unified stage included.
        learned_at: For each ability, the index of the first stage whose data contains it, or ``None``.
        **kwargs: Passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    Example::

        >>> import torch
        >>> metric = AccuracyMatrix(["math", "code"], num_stages=2, learned_at=[0, 1])
        >>> metric.update(0, torch.tensor([0.0, 0.1]))  # before training
        >>> metric.update(1, torch.tensor([0.8, 0.3]))  # after stage 0 (math)
        >>> metric.update(2, torch.tensor([0.5, 0.9]))  # after stage 1 (code)
        >>> {k: [round(x, 3) for x in v.reshape(-1).tolist()] for k, v in metric.compute().items()}
        {'average_accuracy': [0.7], 'forgetting': [0.3, -0.6], 'bwt': [-0.3], 'fwt': [0.2]}
    """

    is_differentiable = False
    higher_is_better = None  # accuracy and transfers: higher is better; forgetting: lower is better
    full_state_update = False

    matrix: Tensor

    def __init__(
        self, abilities: Sequence[str], num_stages: int, learned_at: Sequence[int | None], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if len(abilities) == 0:
            raise ValueError("abilities must name at least one ability, got an empty sequence")
        if len(set(abilities)) != len(abilities):
            raise ValueError(f"abilities must be unique, got {list(abilities)}")
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
        if len(learned_at) != len(abilities):
            raise ValueError(
                f"learned_at must have one entry per ability ({len(abilities)}: {list(abilities)}), "
                f"got {len(learned_at)}"
            )
        for ability, stage in zip(abilities, learned_at, strict=True):
            if stage is not None and (
                isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < num_stages
            ):
                raise ValueError(
                    f"learned_at for ability {ability!r} must be None or a stage index in [0, {num_stages - 1}], "
                    f"got {stage!r}"
                )
        self.abilities = tuple(abilities)
        self.num_stages = num_stages
        self.learned_at = tuple(learned_at)
        self.add_state(
            "matrix",
            default=torch.full((num_stages + 1, len(abilities)), float("nan")),
            dist_reduce_fx="max",
            persistent=True,
        )

    def update(self, row: int, scores: Tensor) -> None:
        """Record (or overwrite) one row of the matrix.

        Args:
            row: 0 for the scores before training, ``i + 1`` for the scores after stage ``i``.
            scores: Shape ``[num_abilities]``, one score in [0, 1] per ability, in the order of ``abilities``.
        """
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row <= self.num_stages:
            raise ValueError(
                f"row must be an int in [0, {self.num_stages}] (0 = before training, i + 1 = after stage i), "
                f"got {row!r}"
            )
        scores = torch.as_tensor(scores)
        if scores.shape != (len(self.abilities),):
            raise ValueError(
                f"scores must have shape [{len(self.abilities)}] (one per ability: {list(self.abilities)}), "
                f"got {list(scores.shape)}"
            )
        # NaN fails both comparisons, so it is refused here: in the state it means "row not recorded".
        if not bool(((scores >= 0) & (scores <= 1)).all()):
            raise ValueError(f"scores must lie in [0, 1], got {scores.tolist()}")
        self.matrix[row] = scores.to(self.matrix)

    def compute(self) -> dict[str, Tensor]:
        """Derive the continual-learning numbers from the stage rows recorded so far.

        Returns:
            ``average_accuracy`` (0-dim), ``forgetting`` (``[num_abilities]``), ``bwt`` (0-dim), ``fwt`` (0-dim),
            all fp32, on the metric's device.

        Raises:
            RuntimeError: No stage row has been recorded yet.
        """
        stage_rows = self.matrix[1:]
        recorded = ~stage_rows.isnan().any(dim=1)  # rows are written whole: one NaN means not recorded
        if not bool(recorded.any()):
            raise RuntimeError(
                "AccuracyMatrix.compute() needs at least one stage row: call update(i + 1, scores) after stage i"
            )
        last = int(recorded.nonzero().max())
        final = stage_rows[last]
        earlier = stage_rows[:last][recorded[:last]]
        forgetting = earlier.max(dim=0).values - final if len(earlier) else torch.zeros_like(final)
        bwt = [final[j] - stage_rows[at, j] for j, at in enumerate(self.learned_at) if at is not None and at < last]
        fwt = [
            stage_rows[at - 1, j] - self.matrix[0, j]
            for j, at in enumerate(self.learned_at)
            if at is not None and 0 < at <= last
        ]
        return {
            "average_accuracy": final.mean(),
            "forgetting": forgetting,
            "bwt": _mean(bwt, final),
            "fwt": _mean(fwt, final),
        }

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Not supported: a row is a whole validation run, not a batch; use :meth:`update` then :meth:`compute`."""
        raise NotImplementedError("AccuracyMatrix has no per-batch value: call update(row, scores), then compute()")

    @property
    def before(self) -> Tensor:
        """Scores before training, shape ``[num_abilities]`` (a copy; NaN until recorded)."""
        return self.matrix[0].clone()

    @property
    def stage_rows(self) -> Tensor:
        """Scores after each stage, shape ``[num_stages, num_abilities]`` (a copy; NaN rows not yet recorded)."""
        return self.matrix[1:].clone()


def _mean(terms: list[Tensor], like: Tensor) -> Tensor:
    """Mean of the non-NaN terms, 0.0 when there is none (a 0-dim tensor of ``like``'s dtype and device)."""
    values = torch.stack(terms) if terms else like.new_empty(0)
    values = values[~values.isnan()]
    return values.mean() if len(values) else like.new_zeros(())
