"""The built-in abilities, generated from a seed with no download: sources of the same kind as user files.

``builtin:math``, ``builtin:code``, ``builtin:general`` and ``builtin:math_code``, which composes math and code
(see their modules for what each contains), are parsed into a :class:`BuiltinSource`, which loads an
:class:`~hft_lightning.data.ability.Ability` the way a file :class:`~hft_lightning.data.source.AbilitySource` does,
scored by the scorers file abilities use (:mod:`hft_lightning.scoring`).
"""

from __future__ import annotations

from dataclasses import dataclass

from hft_lightning.data import builtin_code, builtin_general, builtin_math, builtin_math_code
from hft_lightning.data.ability import Ability, Generator, split_generated
from hft_lightning.errors import ConfigError
from hft_lightning.scoring import ExactMatch, Scorer, code_exec, follows_instructions
from hft_lightning.seeds import derive_seed

BUILTIN_PREFIX = "builtin:"
BUILTIN_ABILITIES: dict[str, tuple[Generator, Scorer]] = {
    "math": (builtin_math.generate, ExactMatch(builtin_math.ANSWER_PATTERN, normalize=int)),
    "code": (builtin_code.generate, code_exec),
    "general": (builtin_general.generate, follows_instructions),
    "math_code": (builtin_math_code.generate, code_exec),
}
"""Name -> the generator and the scorer."""


@dataclass(frozen=True)
class BuiltinSource:
    """A built-in ability, named after the part of ``builtin:<name>`` after the prefix.

    Example::

        BuiltinSource.parse("builtin:math").load(num_train=100, num_val=10, seed=0).name  # 'math'
    """

    name: str

    @classmethod
    def parse(cls, source: str) -> BuiltinSource:
        """The source named by ``builtin:<name>``.

        Raises:
            ConfigError: If ``source`` is not a known built-in ability, listing the allowed ones.
        """
        name = source.removeprefix(BUILTIN_PREFIX)
        if not source.startswith(BUILTIN_PREFIX) or name not in BUILTIN_ABILITIES:
            allowed = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_ABILITIES)
            raise ConfigError(f"data.abilities: unknown ability source {source!r}; allowed: {allowed}")
        return cls(name)

    def load(self, num_train: int | None, num_val: int, seed: int) -> Ability:
        """Generates the ability's splits.

        Args:
            num_train: Training examples to generate (``None``: :data:`DEFAULT_NUM_TRAIN`).
            num_val: Validation examples to generate.
            seed: The run's seed; each ability draws from its own stream, ``derive_seed(seed, "builtin", name)``.
        """
        generate, scorer = BUILTIN_ABILITIES[self.name]
        ability_seed = derive_seed(seed, "builtin", self.name)
        count = DEFAULT_NUM_TRAIN if num_train is None else num_train
        train, val = split_generated(self.name, generate, count, num_val, ability_seed)
        return Ability(name=self.name, train=train, val=val, scorer=scorer)


DEFAULT_NUM_TRAIN = 4000
"""Training examples generated per built-in ability when ``data.num_train`` is not set."""
