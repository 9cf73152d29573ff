"""Component tables: name -> builder, with typed parameters checked against a config dataclass.

(Not the MLflow model registry, which is :mod:`perceive_ir.registry`.)

A registry maps a name (``"restormer"``) to a config dataclass and a builder. A
:class:`ComponentSpec` in a configuration file names the component and carries its
parameters; ``registry.build(spec)`` validates the parameters with
:func:`perceive_ir.config.from_dict` and calls the builder::

    BACKBONES = Registry("backbone")

    @BACKBONES.register("nafnet", NAFNetConfig)
    def build_nafnet(cfg: NAFNetConfig) -> nn.Module: ...

    net = BACKBONES.build(ComponentSpec("nafnet", {"width": 16}))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generic, Iterator, TypeVar

from perceive_ir.config import ConfigError, from_dict

T = TypeVar("T")

__all__ = ["Registry", "RegistryEntry", "ComponentSpec"]


@dataclasses.dataclass(frozen=True)
class RegistryEntry(Generic[T]):
    name: str
    config_cls: type | None
    builder: Callable[..., T]


class Registry(Generic[T]):
    """Names -> (config dataclass, builder). ``kind`` appears in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, RegistryEntry[T]] = {}

    def register(self, name: str, config_cls: type | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@REG.register("name", ConfigCls)`` on a builder ``f(cfg, **extra)``."""

        def decorate(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = RegistryEntry(name, config_cls, builder)
            return builder

        return decorate

    def get(self, name: str) -> RegistryEntry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} '{name}'; registered: {', '.join(sorted(self._entries)) or '(none)'}"
            ) from None

    def config(self, name: str, params: dict[str, Any] | None = None, source: str = "<dict>") -> Any:
        """The typed config of ``name`` from ``params`` (``None`` when it takes no config)."""
        entry = self.get(name)
        if entry.config_cls is None:
            if params:
                raise ConfigError(f"{source}: {self.kind} '{name}' takes no parameters, got {sorted(params)}")
            return None
        return from_dict(entry.config_cls, params or {}, source)

    def build(self, spec: "ComponentSpec | str", *args: Any, **extra: Any) -> T:
        if isinstance(spec, str):
            spec = ComponentSpec(spec)
        entry = self.get(spec.name)
        cfg = self.config(spec.name, spec.params, source=f"{self.kind} '{spec.name}' params")
        if cfg is None:
            return entry.builder(*args, **extra)
        return entry.builder(cfg, *args, **extra)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


@dataclasses.dataclass
class ComponentSpec:
    """``name`` of a registered component and its ``params`` (validated when built)."""

    name: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
