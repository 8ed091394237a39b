"""Peak memory each retention method adds to training, as a multiple of the trainable parameter bytes.

Peak memory is a high-water mark of the whole process, so every method trains in a fresh process: a short mixed
stage that ends with a consolidation (k = 3 remembered abilities: EWC's Fisher passes, GEM's memory), then a stage
the method protects. The peak, over the whole fit, is ``torch.cuda.max_memory_allocated`` on a GPU and the peak
resident set size (``ru_maxrss``, Linux) on a CPU, where it also holds the interpreter, the libraries and the data;
there the children run with a fixed glibc mmap threshold, so every freed tensor goes back to the system and the
resident peak follows the live tensors, not the allocator's caching.
Plain SFT runs first and last; the method's added peak is its peak minus the mean of the two, and the two SFT peaks'
difference is the noise floor printed with it. The model is the embedded LLaMA-style one made wider (29M parameters
by default) so that parameter-sized buffers stand out of that noise. Rows, with the memory each method keeps between
steps for comparison, are appended to ``benchmarks/results/retention_memory.jsonl`` with the device name.

    python benchmarks/bench_retention_memory.py                              # every method, ~10 min on 2 CPUs
    python benchmarks/bench_retention_memory.py --methods ewc --hidden-size 64 --num-layers 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_retention_overhead import METHODS, state_bytes, wide_module
from benchmarks.harness import append_rows, device_name
from hft_lightning import Curriculum, Stage, StagedDataModule

RESULTS = Path(__file__).resolve().parent / "results" / "retention_memory.jsonl"


def peak_bytes(device: torch.device) -> int:
    """The process's peak memory so far: allocated GPU memory on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def train(method: str, hidden_size: int, num_layers: int, device: str, precision: str) -> dict:
    """Trains the mixed stage and the protected one with ``method`` in this process; returns its memory row."""
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    L.seed_everything(0)
    data = StagedDataModule(num_train=200, num_val=4, batch_size=8, val_batch_size=4)
    module = wide_module(data, hidden_size, num_layers)
    callbacks = METHODS[method]()
    stages = [Stage("mixed", 3, {a: 1.0 for a in data.ability_names}), Stage("protected", 4, {"math": 1.0})]
    trainer = L.Trainer(
        accelerator=device, devices=1, precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
        default_root_dir=f"/tmp/bench_retention_memory/{method}", callbacks=[Curriculum(stages), *callbacks],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    trainable = [p for p in module.parameters() if p.requires_grad]
    trained_on = torch.device(device)  # not module.device: the module is back on the CPU after fit
    return {
        "method": method,
        "device": device_name(trained_on),
        "date": datetime.date.today().isoformat(),
        "params": sum(p.numel() for p in trainable),
        "precision": precision,
        "param_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "peak_bytes": peak_bytes(trained_on),
        "state_bytes": sum(state_bytes(c.state_dict()) for c in callbacks),
    }


def _in_fresh_process(method: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", method, "--hidden-size", str(args.hidden_size),
               "--num-layers", str(args.num_layers), "--device", args.device,
               "--precision", args.precision]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # blocks over 64 KiB: their own mappings, freed on free
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if completed.returncode:
        raise RuntimeError(f"{method} failed:\n{completed.stderr[-3000:]}")
    row = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"{method}: peak {row['peak_bytes'] / 2**20:.0f} MiB", flush=True)  # a run cut short still shows these
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Peak memory each retention method adds, against plain SFT.")
    parser.add_argument("--methods", nargs="+", choices=[m for m in METHODS if m != "sft"])
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", help="the trainer's precision, e.g. bf16-mixed")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(train(args.child, args.hidden_size, args.num_layers, args.device, args.precision)))
        return []
    methods = args.methods or [m for m in METHODS if m != "sft"]
    rows = [_in_fresh_process(m, args) for m in ["sft", *methods, "sft"]]
    first, last = rows[0], rows[-1]
    baseline = statistics.fmean([first["peak_bytes"], last["peak_bytes"]])
    noise = abs(first["peak_bytes"] - last["peak_bytes"]) / first["param_bytes"]
    print(f"{first['params'] / 1e6:.1f}M trainable parameters ({first['param_bytes'] / 2**20:.0f} MiB) on "
          f"{first['device']}; SFT peak {baseline / 2**20:.0f} MiB, noise {noise:.2f}x params")  # fmt: skip
    print(f"{'method':18s} {'peak MiB':>9s} {'added/params':>12s} {'kept/params':>11s}")
    for row in rows:
        row["added_over_params"] = (row["peak_bytes"] - baseline) / row["param_bytes"]
        row["kept_over_params"] = row["state_bytes"] / row["param_bytes"]
        row["noise_over_params"] = noise
        print(f"{row['method']:18s} {row['peak_bytes'] / 2**20:9.0f} {row['added_over_params']:12.2f} "
              f"{row['kept_over_params']:11.2f}")  # fmt: skip
    append_rows(args.results, rows)
    return rows


if __name__ == "__main__":
    main()
