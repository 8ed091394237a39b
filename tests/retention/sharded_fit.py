"""Fits the tiny three-stage problem with Replay, KLAnchor and WeightAveraging under DDP or FSDP2; saves the end.

Run as a script, so that Lightning's launcher can start the other processes the same way:

    python tests/retention/sharded_fit.py OUT --strategy fsdp2   # 2 processes, gloo, CPU, ModelParallelStrategy
    python tests/retention/sharded_fit.py OUT --strategy ddp     # the same batches, each process holding all weights

Both train on the same per-process batches at the same learning rate, so FSDP2 must end where DDP ends.
``--lora PRETRAINED`` trains LoRA adapters on the saved model instead, with EWC in place of Replay. Each
process writes ``OUT/rank<r>.pt``: its full parameters (gathered), the number of parameter elements it keeps,
WeightAveraging's choices and the KL term of its last step; the run's report and exported model are in
``OUT/report`` and ``OUT/model``.
"""

import argparse
import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hft_lightning.lora import LoRA
from hft_lightning.retention import EWC, KLAnchor, Replay, WeightAveraging
from hft_lightning.sharding import gathered, reshard
from tests.helpers import tiny_datamodule
from tests.retention.common import fit

STRATEGIES = {
    "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    "ddp": lambda: "ddp",
}


def lora_model(pretrained: Path) -> dict:
    """The module arguments of a LoRA run on the saved model ``pretrained``."""
    return {"name_or_path": str(pretrained), "lora": LoRA(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--strategy", choices=list(STRATEGIES), required=True)
    parser.add_argument("--lora", type=Path)
    args = parser.parse_args()
    averaging = WeightAveraging(alphas=(0.25, 0.5), probe_examples=4)  # either merges
    retention, model, data = Replay(memory_size=8, ratio=0.25), {}, tiny_datamodule(batch_size=4)
    if args.lora:
        retention, model = EWC(lam=10.0, fisher_samples=4), lora_model(args.lora)
        data = tiny_datamodule(batch_size=4, tokenizer_name_or_path=str(args.lora))
    module, trainer = fit(
        args.out,
        [retention, KLAnchor(beta=1.0), averaging],
        data=data,
        module_overrides=model,
        devices=2,
        strategy=STRATEGIES[args.strategy](),
        use_distributed_sampler=False,
    )
    reshard(module)
    params = dict(module.named_parameters())
    state = {
        "params": gathered({n: p.detach().clone() for n, p in params.items()}),
        "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params.values()),
        "numel": sum(p.numel() for p in params.values()),
        "merges": [{k: v for k, v in m.items() if k != "seconds"} for m in averaging.merges],
        "retention": retention.state_dict(),
        "kl": trainer.callback_metrics["retention/kl"],
        "trainable": sorted(n for n, p in params.items() if p.requires_grad),
    }
    torch.save(state, args.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
