"""The search space: dotted keys of the stage-2 config, each with a distribution written in YAML.

    loss.l1: {loguniform: [0.01, 1.0]}
    loss.l3: {quniform: [0.0, 0.3, 0.05]}        # quantised: low, high, step
    loss.perceptual.params.tier_thresholds.0: {uniform: [0.2, 0.45]}   # a list item by its index
    optimizer.lr: {choice: [1.0e-4, 1.0e-3]}
    loss.l2: {grid: [0.0, 0.05, 0.1]}            # every value, once per sample

Every key is checked by applying its extreme (or listed) values to the stage-2 config through the
configuration's override machinery, so a misspelt key or a value the config refuses fails before
Ray starts, naming the key.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import yaml

from perceive_ir.config import ConfigError

__all__ = ["Distribution", "parse_space", "to_tune_space", "value_overrides", "yaml_value", "DISTRIBUTIONS"]

# name -> number of numeric arguments (None: a list of values)
DISTRIBUTIONS: dict[str, int | None] = {
    "choice": None, "grid": None, "uniform": 2, "loguniform": 2, "quniform": 3, "qloguniform": 3,
}


@dataclass(frozen=True)
class Distribution:
    key: str
    kind: str
    args: tuple

    @property
    def is_log(self) -> bool:
        return self.kind in ("loguniform", "qloguniform")

    def probe_values(self) -> list[Any]:
        """The values that must all be accepted by the stage-2 config."""
        if DISTRIBUTIONS[self.kind] is None:
            return list(self.args)
        low, high = self.args[0], self.args[1]
        if self.kind.startswith("q"):
            step = self.args[2]
            low, high = math.ceil(low / step) * step, math.floor(high / step) * step
        return [low, high]

    def tune_domain(self):
        from ray import tune

        builders: dict[str, Callable] = {
            "choice": lambda a: tune.choice(list(a)), "grid": lambda a: tune.grid_search(list(a)),
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "quniform": lambda a: tune.quniform(*a), "qloguniform": lambda a: tune.qloguniform(*a),
        }
        return builders[self.kind](self.args)


def _parse_one(key: str, spec: Any, where: str) -> Distribution:
    names = ", ".join(DISTRIBUTIONS)
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"{where}: search space '{key}' must be one of {{{names}}}: <arguments>, got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: search space '{key}': unknown distribution '{kind}'; expected one of: {names}")
    arity = DISTRIBUTIONS[kind]
    if not isinstance(args, Sequence) or isinstance(args, str) or not args:
        raise ConfigError(f"{where}: search space '{key}': '{kind}' needs a list, got {args!r}")
    if arity is None:
        return Distribution(key, kind, tuple(args))
    if len(args) != arity or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        shape = "[low, high]" if arity == 2 else "[low, high, step]"
        raise ConfigError(f"{where}: search space '{key}': '{kind}' needs {shape} numbers, got {args!r}")
    low, high = float(args[0]), float(args[1])
    if not low < high:
        raise ConfigError(f"{where}: search space '{key}': '{kind}' needs low < high, got {args!r}")
    if kind in ("loguniform", "qloguniform") and low <= 0:
        raise ConfigError(f"{where}: search space '{key}': '{kind}' needs low > 0, got {args!r}")
    if arity == 3 and not 0 < args[2] <= high - low:
        raise ConfigError(f"{where}: search space '{key}': '{kind}' step must be in (0, high - low], got {args!r}")
    return Distribution(key, kind, tuple(float(a) for a in args))


def parse_space(space: Mapping[str, Any], where: str) -> list[Distribution]:
    if not space:
        raise ConfigError(f"{where}: 'space' is empty: give at least one dotted key of the stage-2 config")
    return [_parse_one(str(key), spec, where) for key, spec in space.items()]


def to_tune_space(distributions: Sequence[Distribution]) -> dict[str, Any]:
    return {d.key: d.tune_domain() for d in distributions}


def yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def value_overrides(values: Mapping[str, Any], base_tree: Mapping[str, Any]) -> list[str]:
    """``key=value`` overrides (YAML values) for sampled ``values``. A key ending in an index
    (``...tier_thresholds.0``) replaces that item of the list the base config holds at its parent."""
    lists: dict[str, list] = {}
    overrides: list[str] = []
    for key, value in values.items():
        parent, _, last = key.rpartition(".")
        if last.isdigit() and parent:
            if parent not in lists:
                current = _lookup(base_tree, parent)
                if not isinstance(current, list):
                    raise ConfigError(f"search space '{key}': '{parent}' is not a list in the stage-2 config")
                lists[parent] = copy.deepcopy(current)
            index = int(last)
            if index >= len(lists[parent]):
                raise ConfigError(f"search space '{key}': '{parent}' has {len(lists[parent])} items")
            lists[parent][index] = value
        else:
            overrides.append(f"{key}={yaml_value(value)}")
    overrides += [f"{parent}={yaml_value(items)}" for parent, items in lists.items()]
    return overrides
