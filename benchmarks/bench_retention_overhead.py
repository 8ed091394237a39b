"""Time per optimizer step of each retention method against plain SFT, in the same run, on the embedded default.

A short mixed stage (all abilities) ends with a consolidation, so the timed stage after it protects three
abilities (GEM's k = 3). Each method trains the same timed stage from the same seed; a step is timed from
``on_train_batch_start`` (before Replay edits the batch) to ``on_train_batch_end`` (after the optimizer step),
the mean over the stage's steps after two warm-up steps (a mean, not a median: with ``ref_every > 1`` one step in
``ref_every`` pays for the references, and the mean charges it). The methods take turns, SFT first, for
``--rounds`` rounds; each method's ratio is taken against the SFT of its own round and the median over rounds is
reported with its range, so a slow spell of a shared machine shows as a spread instead of moving one method. The
script also measures the memory each method keeps between steps (the tensors of its ``state_dict``) as a multiple
of the trainable parameter bytes.
Results are printed and appended to ``benchmarks/results/retention_overhead.jsonl`` with the device name.
``--hidden-size``/``--num-layers`` widen the model (``wide_module``; hidden 1024 x 8 layers is about 1e8 parameters)
and ``--precision`` sets the trainer's precision (e.g. ``bf16-mixed`` on a GPU). ``--strategy ddp`` or ``fsdp2``
trains on ``--devices`` processes (CPU: gloo), each method's ratio taken against SFT under the same strategy; the
global batch stays the same, each process taking its share, and rank 0's step times are reported.

    python benchmarks/bench_retention_overhead.py                 # every method, 30 timed steps, 3 rounds
    python benchmarks/bench_retention_overhead.py --methods ewc --steps 5 --rounds 1
    python benchmarks/bench_retention_overhead.py --hidden-size 1024 --num-layers 8 --precision bf16-mixed
    python benchmarks/bench_retention_overhead.py --strategy fsdp2 --devices 2   # FSDP2, 2 processes
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import append_rows, device_name
from hft_lightning import Curriculum, HFTModule, Stage, StagedDataModule
from hft_lightning.retention import (
    AGEM,
    EWC,
    GEM,
    ForgettingBudget,
    KLAnchor,
    OnlineEWC,
    Replay,
    WeightAveraging,
    trainable,
)

RESULTS = Path(__file__).resolve().parent / "results" / "retention_overhead.jsonl"
METHODS: dict[str, Callable[[], list[Callback]]] = {
    "sft": lambda: [],
    "ewc": lambda: [EWC()],
    "online_ewc": lambda: [OnlineEWC()],
    "gem": lambda: [GEM()],
    "gem_ref_every_10": lambda: [GEM(ref_every=10)],
    "agem": lambda: [AGEM()],
    "agem_ref_every_10": lambda: [AGEM(ref_every=10)],
    "replay": lambda: [Replay()],
    "replay+ewc": lambda: [Replay(), EWC()],
    "kl_anchor": lambda: [KLAnchor()],
    "replay+kl_anchor": lambda: [Replay(), KLAnchor()],
    "weight_averaging": lambda: [WeightAveraging()],
    "replay+budget_rollback": lambda: [Replay(), ForgettingBudget(policy="rollback")],
}
STRATEGIES: dict[str, Callable[[int], Strategy | str]] = {
    "single": lambda devices: "auto",
    "ddp": lambda devices: "ddp",
    "fsdp2": lambda devices: ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
}


class StepTimer(Callback):
    """Wall time of every training batch of the last stage, from batch start to the end of its optimizer step.

    On a GPU both ends synchronize the device, so a step's time is its whole work (queued kernels included), not
    the time the host took to queue it.
    """

    def __init__(self):
        self.seconds: list[float] = []
        self.device = ""
        self._start = 0.0

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module):  # noqa: D102
        self.device = device_name(pl_module.device)  # the module is back on the CPU after fit

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
        self._start = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        if trainer.current_epoch == 1:
            self.seconds.append(self._now(pl_module) - self._start)


def state_bytes(state) -> int:
    """Bytes of the tensors in ``state`` (nested dicts, lists and tuples walked)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(state_bytes(v) for v in state)
    return 0


def wide_module(data: StagedDataModule, hidden_size: int, num_layers: int) -> HFTModule:
    """The embedded LLaMA-style model widened to ``hidden_size`` x ``num_layers`` (64-dim heads, MLP 8/3 wide).

    Its learning rate is 1e-4: the default model's 3e-3 makes a model this wide diverge.
    """
    intermediate = -(-8 * hidden_size // 3 // 64) * 64
    return HFTModule(
        data.tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=max(1, hidden_size // 64),
        intermediate_size=intermediate, learning_rate=1e-4,
    )  # fmt: skip


def measure(name: str, data: StagedDataModule, args: argparse.Namespace) -> dict:
    """Trains the warm-up and the timed stage with method ``name``; returns its timing and memory row."""
    L.seed_everything(0)
    if args.hidden_size is None:
        module = HFTModule(data.tokenizer)
    else:
        module = wide_module(data, args.hidden_size, args.num_layers)
    methods = METHODS[name]()
    timer = StepTimer()
    stages = [Stage("warmup", 5, {a: 1.0 for a in data.ability_names}), Stage("timed", args.steps + 2, {"math": 1.0})]
    devices = 1 if args.strategy == "single" else args.devices
    trainer = L.Trainer(
        accelerator=args.device, devices=devices, strategy=STRATEGIES[args.strategy](devices),
        use_distributed_sampler=False, precision=args.precision, max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=f"/tmp/bench_retention/{name}", callbacks=[timer, Curriculum(stages), *methods],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    state = sum(state_bytes(m.state_dict()) for m in methods)  # gathered under FSDP2: a collective
    params = trainable(module)  # resharded first: the gathered parameters may be in another dtype
    return {
        "method": name,
        "device": timer.device,
        "strategy": args.strategy,
        "processes": devices,
        "date": datetime.date.today().isoformat(),
        "params": sum(p.numel() for p in params.values()),
        "precision": args.precision,
        "step_ms": 1000 * statistics.fmean(timer.seconds[2:]),
        "state_bytes_over_params": state / sum(p.numel() * p.element_size() for p in params.values()),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Retention overhead per optimizer step, against plain SFT.")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per method and round")
    parser.add_argument("--rounds", type=int, default=3, help="times every method is measured, taking turns")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden-size", type=int, help="widen the model (default: the embedded default model)")
    parser.add_argument("--num-layers", type=int, default=4, help="layers of the widened model")
    parser.add_argument("--precision", default="32-true", help="the trainer's precision, e.g. bf16-mixed")
    parser.add_argument("--strategy", choices=list(STRATEGIES), default="single", help="one process, DDP or FSDP2")
    parser.add_argument("--devices", type=int, default=2, help="processes under --strategy ddp or fsdp2")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    data = StagedDataModule(num_train=500, num_val=4, val_batch_size=4)
    methods = ["sft", *(m for m in args.methods if m != "sft")]
    rows = []
    for round_index in range(args.rounds):
        measured = [{**measure(name, data, args), "round": round_index} for name in methods]
        for row in measured:
            row["ratio_vs_sft"] = row["step_ms"] / measured[0]["step_ms"]
        rows += measured
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return rows
    where = f"{rows[0]['device']}, {args.strategy} x {rows[0]['processes']}"
    print(f"{'method':18s} {'ms/step':>8s} {'x sft':>6s} {'range':>11s} {'state/params':>12s}   ({where})")
    for name in methods:
        mine = [row for row in rows if row["method"] == name]
        ratios = [row["ratio_vs_sft"] for row in mine]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"{name:18s} {statistics.median(r['step_ms'] for r in mine):8.1f} {statistics.median(ratios):6.2f} "
              f"{spread:>11s} {mine[0]['state_bytes_over_params']:12.2f}")  # fmt: skip
    append_rows(args.results, rows)
    return rows


if __name__ == "__main__":
    main()
