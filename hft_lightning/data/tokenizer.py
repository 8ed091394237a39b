"""The tokenizer of a run: a pretrained model's own, or a byte-level BPE tokenizer trained locally.

A pretrained tokenizer (:func:`load_tokenizer`) keeps its chat template, so fine-tuning formats conversations
exactly as the model will be prompted later. A tokenizer without one (a base model's) gets
:data:`CHAT_TEMPLATE`, with a warning: conversations are never concatenated without role markers.

The embedded default (:func:`build_tokenizer`) is trained on the abilities' data. Digits are split one per token
(arithmetic stays learnable for a tiny model), whitespace is kept byte for byte (Python indentation survives a
round trip), and the chat roles and the end-of-turn marker are special tokens. Training on ~10k short examples
takes well under a second.
"""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch.utilities import rank_zero_warn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from hft_lightning.errors import ConfigError

PAD, END, SYSTEM, USER, ASSISTANT = "<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""Renders ``<|role|>\\ncontent<eos>\\n`` per turn (``<eos>`` is ``<|end|>`` in the embedded tokenizer).

Assistant content is marked as ``{% generation %}`` for tools that read the mask from the template. A pretrained
tokenizer without a chat template gets this one: its role markers are then plain text, and every turn ends with
the tokenizer's own end-of-sequence token, where generation stops.
"""


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


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Loads a pretrained model's fast tokenizer, ready for chat SFT.

    Args:
        name_or_path: A Hugging Face Hub model name or a local folder written by ``save_pretrained``.

    Returns:
        The tokenizer, with its own chat template (:data:`CHAT_TEMPLATE` if it has none, with a warning) and a
        padding token (its end-of-sequence token if it has none; padded positions are masked out anyway).

    Raises:
        ConfigError: Naming ``model.name_or_path``, if the tokenizer cannot be loaded, is not a fast tokenizer
            (masking needs character offsets) or has no end-of-sequence token.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.name_or_path: cannot load the tokenizer of {name_or_path!r}: {error}") from None
    if not tokenizer.is_fast:
        raise ConfigError(
            f"model.name_or_path: the tokenizer of {name_or_path!r} is a slow ({type(tokenizer).__name__}) one; "
            "assistant-only masking needs a fast tokenizer (tokenizer.json)"
        )
    if tokenizer.eos_token is None:
        raise ConfigError(
            f"model.name_or_path: the tokenizer of {name_or_path!r} has no eos_token; turns could not end"
        )
    if tokenizer.chat_template is None:
        rank_zero_warn(
            f"The tokenizer of {name_or_path!r} has no chat template; using hft_lightning's "
            f"(<|role|>\\ncontent{tokenizer.eos_token}\\n per turn), saved with the fine-tuned model"
        )
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
