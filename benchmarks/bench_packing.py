"""Time per training step with packed rows against padded ones, in the same run, on the embedded default.

Every setting trains its own copy of the same model on the same batches of a stage mixing every ability (the
lengths differ most there): forward, backward and the AdamW step, the settings taking turns batch by batch, timed
after ``--warmup`` steps. Besides the time, each row records how full the rows are: the batch's tokens over the
tokens its rows hold (``1.0``: no padding).
Results are printed and appended to ``benchmarks/results/packing.jsonl`` with the device name.

    python benchmarks/bench_packing.py                              # padded, then rows of 64 .. 512 tokens
    python benchmarks/bench_packing.py --row-lengths 128 --steps 5
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import append_rows, device_name
from hft_lightning import HFTModule, StagedDataModule
from hft_lightning.data.packing import pack_batch

RESULTS = Path(__file__).resolve().parent / "results" / "packing.jsonl"
NUM_TRAIN = 500  # training examples per built-in ability the batches are drawn from


class Setting:
    """One way to lay the batches out: its own copy of the model and optimizer, and its step times."""

    def __init__(self, module: HFTModule, row_length: int | None):
        self.module = copy.deepcopy(module)
        self.module.packing = row_length
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-3)
        self.seconds: list[float] = []

    def step(self, batch: dict) -> None:
        """One timed training step: forward, backward, AdamW."""
        start = time.perf_counter()
        self.module.sft_loss(batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - start)

    def row(self, batches: list[dict], warmup: int) -> dict:
        """The result row: mean step time after ``warmup`` steps, and how full the rows were."""
        row_length = self.module.packing
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        if row_length is None:
            held = sum(b["input_ids"].numel() for b in batches)
        else:
            held = sum(pack_batch(b, 0, row_length)["input_ids"].numel() for b in batches)
        return {
            "packing": row_length,
            "device": device_name(self.module.device),
            "date": datetime.date.today().isoformat(),
            "batch_size": len(batches[0]["input_ids"]),
            "step_ms": 1000 * statistics.fmean(self.seconds[warmup:]),
            "fill": real / held,
        }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Training step time with packed rows, against padded rows.")
    parser.add_argument("--row-lengths", nargs="+", type=int, default=[64, 128, 256, 512])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    data = StagedDataModule(num_train=NUM_TRAIN, num_val=4)
    torch.manual_seed(0)
    module = HFTModule(data.tokenizer).to(args.device)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps + args.warmup):
        draw = torch.randint(len(data.ability_names) * NUM_TRAIN, (args.batch_size,), generator=generator).tolist()
        batch = data.collate([(data.ability_names[i // NUM_TRAIN], i % NUM_TRAIN) for i in draw])
        batches.append({key: value.to(args.device) for key, value in batch.items()})
    settings = [Setting(module, length) for length in [None, *args.row_lengths]]
    for batch in batches:  # round robin: a slow spell of the machine hits every setting alike
        for setting in settings:
            setting.step(batch)
    rows = [setting.row(batches, args.warmup) for setting in settings]
    baseline = rows[0]["step_ms"]
    print(f"{'packing':>8s} {'ms/step':>8s} {'x padded':>8s} {'fill':>5s}   ({rows[0]['device']})")
    for row in rows:
        row["ratio_vs_padded"] = row["step_ms"] / baseline
        name = "padded" if row["packing"] is None else str(row["packing"])
        print(f"{name:>8s} {row['step_ms']:8.1f} {row['ratio_vs_padded']:8.2f} {row['fill']:5.2f}")
    append_rows(args.results, rows)
    return rows


if __name__ == "__main__":
    main()
