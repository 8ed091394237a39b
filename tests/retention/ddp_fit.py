"""Fits the tiny three-stage problem with the retention methods that keep tensors; saves what each process ends with.

The methods: EWC, OnlineEWC, GEM, AGEM, KLAnchor and WeightAveraging. Run as a script, so that Lightning's
launcher can start the other processes the same way:

    python tests/retention/ddp_fit.py OUT --devices 2 --batch-size 4           # DDP: 2 processes, gloo, CPU
    python tests/retention/ddp_fit.py OUT --devices 2 --batch-size 4 --fsdp2   # FSDP2 (ModelParallelStrategy)
    python tests/retention/ddp_fit.py OUT --devices 1 --batch-size 8           # the same global batches on one

``--checkpoint-every N`` also saves a checkpoint every N steps into ``OUT/ckpt``; ``--ckpt-path`` resumes from one.
``--learning-rate`` replaces the negligible default (below). ``--budget`` adds a ForgettingBudget (policy rollback)
whose scripted probe sees math fall at step 7 (:func:`math_falls_at_step_7`), so the weights and the optimizer's state
of step 6 are restored there; the gathered weights and optimizer state after steps 6 and 7 are saved.
``--planner affinity`` orders the stages by gradient affinity; ``--planner rank-dependent`` with a planner whose
measurement differs on every process; ``--planner failing`` with one that raises.

The learning rate is negligible, so both runs estimate Fisher and reference gradients at the same weights and
their retention state must agree (WeightAveraging's alpha choices included; its wall-clock seconds are left out).
Each process writes ``OUT/rank<r>.pt``: the full (gathered) parameters and retention state, and the number of
retention state elements the process itself keeps (its shards under FSDP2).
"""

import argparse
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hft_lightning import Curriculum
from hft_lightning.errors import ConfigError
from hft_lightning.planners import Affinity, Decision, Planner, Probe
from hft_lightning.retention import AGEM, EWC, GEM, ForgettingBudget, KLAnchor, OnlineEWC, WeightAveraging
from hft_lightning.retention import forgetting_budget as forgetting_budget_module
from hft_lightning.sharding import gathered, local, reshard
from tests.helpers import tiny_datamodule
from tests.retention.common import ScriptedProbe, fit

ROLLBACK_STEPS = (6, 7)
"""The good check the budget rolls back to, and the check at which it does."""


def math_falls_at_step_7(step: int, ability: str) -> float:
    """Math scores 0.8 except 0.5 at step 7 (in the code stage); the others score step / 100."""
    if ability == "math":
        return 0.5 if step == ROLLBACK_STEPS[1] else 0.8
    return step / 100


class Snapshots(Callback):
    """The gathered weights and optimizer state after the steps ``ROLLBACK_STEPS`` (after the budget's check)."""

    def __init__(self):
        self.taken: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in ROLLBACK_STEPS:
            reshard(pl_module)
            optimizer, named = trainer.optimizers[0], dict(pl_module.named_parameters())
            state = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in named.items()}
            params = {n: p.detach().clone() for n, p in named.items()}
            self.taken[trainer.global_step] = gathered({"params": params, "optimizer": state})


class RankDependent(Planner):
    """A measuring planner that decides another order on each process, as rounding on other devices could."""

    measures = True

    def order(self, abilities: list[str], probe: Probe | None) -> Decision:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        order = list(abilities) if rank == 0 else abilities[::-1]
        return Decision(order, dict.fromkeys(order, f"measured on rank {rank}"))


class Failing(Planner):
    """A measuring planner whose measurement fails (on rank 0, the only process that measures)."""

    measures = True

    def order(self, abilities: list[str], probe: Probe | None) -> Decision:
        raise ConfigError("data.abilities['math'].val: the probe failed on purpose")


PLANNERS = {
    "affinity": lambda: Affinity(examples=4, batch_size=2),
    "failing": Failing,
    "rank-dependent": RankDependent,
}


def _local_numel(state) -> int:
    """The number of tensor elements this process keeps in ``state`` (dicts and lists walked)."""
    if isinstance(state, torch.Tensor):
        return local(state).numel()
    values = state.values() if isinstance(state, dict) else state if isinstance(state, list) else ()
    return sum(_local_numel(value) for value in values)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--ckpt-path")
    parser.add_argument("--planner", choices=list(PLANNERS))
    parser.add_argument("--fsdp2", action="store_true")
    parser.add_argument("--learning-rate", type=float, default=1e-20)
    parser.add_argument("--budget", action="store_true")
    args = parser.parse_args()
    ewc, online = EWC(lam=10.0, fisher_samples=8), OnlineEWC(lam=10.0, gamma=0.5, fisher_samples=4)
    gem, agem = GEM(memory_size=6, batch_size=3), AGEM(memory_size=6, batch_size=4, ref_every=2)
    kl = KLAnchor(beta=1.0)
    averaging = WeightAveraging(alphas=(0.5, 1.0), probe_examples=4)
    strategy = "ddp" if args.devices > 1 else "auto"
    if args.fsdp2:
        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    watched = []
    if args.budget:  # the real probe is WeightAveraging's, tested here too
        ScriptedProbe.script = staticmethod(math_falls_at_step_7)
        forgetting_budget_module.Probe = ScriptedProbe
        watched = [budget := ForgettingBudget(policy="rollback"), snapshots := Snapshots()]
    checkpoints = []
    if args.checkpoint_every:
        checkpoints = [ModelCheckpoint(args.out / "ckpt", every_n_train_steps=args.checkpoint_every, save_top_k=-1)]
    module, trainer = fit(
        args.out,
        [ewc, online, gem, agem, kl, averaging, *watched, *checkpoints],
        planner=PLANNERS[args.planner]() if args.planner else None,
        data=tiny_datamodule(batch_size=args.batch_size),
        module_overrides={"learning_rate": args.learning_rate},
        devices=args.devices,
        strategy=strategy,
        use_distributed_sampler=False,
        ckpt_path=args.ckpt_path,
    )
    reshard(module)
    kept = {"ewc": ewc.consolidated, "online_ewc": [online.fisher, online.anchor]}
    kept |= {"gem": gem.references.refs, "agem": agem.references.refs, "kl": kl.reference}
    state = {
        "world_size": trainer.world_size,
        "plan": Curriculum.of(trainer).plan.to_dict()["stages"],
        "params": gathered({n: p.detach().clone() for n, p in module.named_parameters()}),
        "ewc": ewc.state_dict(),
        "online_ewc": online.state_dict(),
        "gem": gem.state_dict(),
        "agem": agem.state_dict(),
        "kl": kl.state_dict(),
        "wa": {"merges": [{k: v for k, v in m.items() if k != "seconds"} for m in averaging.merges]},
        "local_numel": {method: _local_numel(tensors) for method, tensors in kept.items()},
    }
    if args.budget:
        state["budget"] = {k: v for k, v in budget.state_dict().items() if k != "seconds"}
        state["snapshots"] = snapshots.taken
    torch.save(state, args.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
