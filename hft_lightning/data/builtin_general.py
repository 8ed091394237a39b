"""``builtin:general``: instructions with verifiable constraints, in the spirit of IFEval.

Each example carries machine-checkable constraints on the response (a word repeated a number of times,
upper-case letters, a required ordering of words, required words). A generation is correct when it
satisfies every constraint of its example (``instructions``); nothing is compared against the reference text.
"""

from __future__ import annotations

import random
import re

from hft_lightning.data.example import Example

WORDS = (
    "apple", "river", "cloud", "stone", "tiger", "piano", "lemon", "candle", "forest", "rocket",
    "violet", "anchor", "garden", "window", "silver", "thunder", "pepper", "marble", "falcon", "meadow",
)  # fmt: skip
TOPICS = ("the sea", "winter", "music", "a city", "the moon", "friendship", "a journey", "breakfast")


def generate(rng: random.Random) -> Example:
    """Draws one instruction with its constraints.

    Args:
        rng: Seeded random source.

    Returns:
        An example whose reference is ``{"constraints": [{"type": ..., ...}, ...]}`` (types:
        :data:`hft_lightning.scoring.scorers.CHECKS`).
    """
    kind = rng.choice(("repeat", "repeat_upper", "reverse", "contains"))
    if kind in ("repeat", "repeat_upper"):
        word, count = rng.choice(WORDS), rng.randint(2, 5)
        if kind == "repeat":
            prompt = f"Write the word {word} exactly {count} times, separated by spaces."
            constraints = [{"type": "repeat", "word": word, "count": count}]
        else:
            prompt = f"Write the word {word} exactly {count} times in capital letters, separated by spaces."
            word = word.upper()
            constraints = [{"type": "repeat", "word": word, "count": count}, {"type": "uppercase"}]
        response = " ".join([word] * count)
    elif kind == "reverse":
        words = rng.sample(WORDS, 3)
        prompt = f"List these words in reverse order, separated by commas: {', '.join(words)}."
        response = ", ".join(reversed(words))
        constraints = [{"type": "order", "words": list(reversed(words))}]
    else:
        topic, word = rng.choice(TOPICS), rng.choice(WORDS)
        prompt = f"Write one sentence about {topic} that uses the word {word}."
        response = f"When I think of {topic}, I picture a {word}."
        topic_words = [w for w in re.findall(r"[A-Za-z]+", topic) if w not in ("a", "the")]
        constraints = [{"type": "contains", "words": [*topic_words, word]}]
    return Example(prompt=prompt, response=response, reference={"constraints": constraints})
