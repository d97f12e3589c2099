"""One registry per kind of thing (backbone, head, strategy, optimiser, scheduler, dataset, index
type, loss): a name -> factory table filled by ``@REGISTRY.register(name)`` where the thing is
implemented.

The names a config accepts are the kind's vocabulary in :mod:`gce.config.vocabulary` (torch-free,
so a config is checked before the ML stack loads). A registry refuses a name outside its vocabulary
and :meth:`Registry.missing` lists vocabulary names without a factory, which tests keep empty: adding
a thing is one vocabulary name and one registered function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from gce.errors import ConfigError

__all__ = ["Registry"]

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """Factories of one kind of thing, by name; ``key`` is the config key errors name."""

    def __init__(self, kind: str, key: str, vocabulary: tuple[str, ...]) -> None:
        self.kind, self.key, self.vocabulary = kind, key, vocabulary
        self._factories: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: ``factory`` builds the ``name`` of this kind."""
        if name not in self.vocabulary:
            raise ValueError(
                f"{self.kind} {name!r} is not in the vocabulary ({', '.join(self.vocabulary)});"
                f" add it to gce.config.vocabulary first"
            )
        if name in self._factories:
            raise ValueError(f"{self.kind} {name!r} is registered twice")

        def add(factory: F) -> F:
            self._factories[name] = factory
            return factory

        return add

    def __getitem__(self, name: str) -> F:
        try:
            return self._factories[name]
        except KeyError:
            valid = ", ".join(self._factories)
            raise ConfigError(f"{self.key}={name!r} is unknown; valid {self.kind} names: {valid}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self._factories)

    def __len__(self) -> int:
        return len(self._factories)

    def missing(self) -> list[str]:
        """Vocabulary names that have no factory (a test keeps this empty)."""
        return [name for name in self.vocabulary if name not in self._factories]
