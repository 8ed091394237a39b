"""Session-wide test settings, the shared tiny datamodule, and the two abilities probes are tested on."""

import os
import random

import pytest
import torch

# triton.jit decides at decoration time whether a kernel is compiled or interpreted: without a GPU, the Triton
# kernels run on CPU through the interpreter, so this must be set before anything imports `hft_kernels`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_data():
    from tests.helpers import tiny_datamodule

    return tiny_datamodule()


@pytest.fixture(scope="session")
def tiny_pretrained(tiny_data, tmp_path_factory):
    """A folder holding a tiny saved Qwen2 model and its ChatML tokenizer: a user's own checkpoint."""
    from tests.helpers import save_tiny_pretrained

    return save_tiny_pretrained(tmp_path_factory.mktemp("tiny_pretrained"), tiny_data)


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """Two file abilities: ``easy`` always answers "yes", ``hard`` answers random letters."""
    from hft_lightning.data.source import AbilitySource
    from tests.data.files import write_jsonl

    root = tmp_path_factory.mktemp("abilities")
    letters = random.Random(0)
    sources = []
    for name, response in (("hard", lambda: "".join(letters.choices("abcdefghij", k=12))), ("easy", lambda: "yes")):
        for split in ("train", "val"):
            write_jsonl(
                root / f"{name}_{split}.jsonl", [{"prompt": f"Q{i}?", "response": response()} for i in range(40)]
            )
        sources.append(
            AbilitySource(name, str(root / f"{name}_train.jsonl"), "exact_match", str(root / f"{name}_val.jsonl"))
        )
    return sources


@pytest.fixture(scope="session")
def easy_and_hard(sources):
    from hft_lightning import StagedDataModule

    return StagedDataModule(abilities=sources, num_val=40, batch_size=16, vocab_size=300)


@pytest.fixture(scope="session")
def base_model(easy_and_hard):
    """The tiny model after a few steps on both abilities: it has learned the easy one, not the random one."""
    import lightning as L

    from tests.helpers import tiny_module

    L.seed_everything(0)
    module = tiny_module(easy_and_hard)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    items = [(a, i) for i in range(16) for a in ("easy", "hard")]
    for _ in range(25):
        optimizer.zero_grad()
        module.sft_loss(easy_and_hard.collate(items)).backward()
        optimizer.step()
    return module
