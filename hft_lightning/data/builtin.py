"""The built-in abilities, generated from a seed with no download.

``builtin:math``, ``builtin:code`` and ``builtin:general``: see their modules for what each contains.
"""

from __future__ import annotations

from hft_lightning.data import builtin_code, builtin_general, builtin_math
from hft_lightning.data.ability import Ability, Generator, Scorer, split_generated
from hft_lightning.errors import ConfigError

BUILTIN_PREFIX = "builtin:"
BUILTIN_ABILITIES: dict[str, tuple[Generator, Scorer]] = {
    "math": (builtin_math.generate, builtin_math.score),
    "code": (builtin_code.generate, builtin_code.score),
    "general": (builtin_general.generate, builtin_general.score),
}


def load_ability(source: str, num_train: int, num_val: int, seed: int) -> Ability:
    """Builds an ability from its source string.

    Args:
        source: ``builtin:<name>`` with ``<name>`` one of :data:`BUILTIN_ABILITIES`.
        num_train: Number of training examples.
        num_val: Number of validation examples.
        seed: Generation seed; each ability offsets it by its index among the built-in names, so abilities draw
            independently.

    Returns:
        The ability, named after ``<name>``.

    Raises:
        ConfigError: If the source is not a known built-in ability.
    """
    name = source.removeprefix(BUILTIN_PREFIX)
    if not source.startswith(BUILTIN_PREFIX) or name not in BUILTIN_ABILITIES:
        allowed = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_ABILITIES)
        raise ConfigError(f"data.abilities: unknown ability source {source!r}; allowed: {allowed}")
    generate, scorer = BUILTIN_ABILITIES[name]
    ability_seed = seed * 1000 + sorted(BUILTIN_ABILITIES).index(name)
    train, val = split_generated(name, generate, num_train, num_val, ability_seed)
    return Ability(name=name, train=train, val=val, scorer=scorer)
