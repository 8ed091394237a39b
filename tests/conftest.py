"""Session-wide test settings and the shared tiny datamodule."""

import os

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
