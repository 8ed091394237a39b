"""A byte-level BPE tokenizer trained locally on the built-in data, with a chat template.

Digits are split one per token (arithmetic stays learnable for a tiny model), whitespace is kept
byte for byte (Python indentation survives a round trip), and the chat roles and the end-of-turn
marker are special tokens. Training on ~10k short examples takes well under a second.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, END, SYSTEM, USER, ASSISTANT = "<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""Renders ``<|role|>\\ncontent<|end|>\\n`` per turn; assistant content is marked as generation (trained)."""


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on ``texts`` and wraps it for ``transformers``.

    Args:
        texts: The corpus (prompts and responses of every ability).
        vocab_size: Target vocabulary size, special tokens and the 256 byte symbols included.

    Returns:
        A fast tokenizer with ``<|pad|>`` padding, ``<|end|>`` as end of sequence, left padding (for batched
        generation) and :data:`CHAT_TEMPLATE`.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, END, SYSTEM, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=END,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
