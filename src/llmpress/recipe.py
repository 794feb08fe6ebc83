"""Recipes: ordered rules that say which codec compresses which tensor.

A recipe is data. Each rule has a ``match`` regex over the parameter name (e.g.
``model.layers.3.mlp.down_proj``), a ``method`` (a registered codec name, or ``keep`` to
leave the tensor as it is) and the method's parameters. The first rule that matches wins.

Sample YAML::

    rules:
      - match: "lm_head|embed_tokens"
        method: keep
      - match: "mlp\\.down_proj"
        method: gptq
        bits: 4
        group_size: 64
      - match: ".*"
        method: rtn
        bits: 4
        group_size: 128
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import InputError

KEEP = "keep"


@dataclass
class Rule:
    match: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self._rx = re.compile(self.match)
        except re.error as e:
            raise InputError(f"recipe rule has a bad regex {self.match!r}: {e}") from None

    def matches(self, name: str) -> bool:
        return self._rx.search(name) is not None

    def to_dict(self) -> dict[str, Any]:
        return {"match": self.match, "method": self.method, **self.params}


@dataclass
class Recipe:
    rules: list[Rule]

    def rule_for(self, name: str) -> Rule | None:
        for r in self.rules:
            if r.matches(name):
                return r
        return None

    def validate(self, names: Iterable[str]) -> None:
        """Refuse unknown methods and a recipe that compresses nothing, before any work."""
        from .tensor import get_codec

        for r in self.rules:
            if r.method != KEEP:
                get_codec(r.method)
        names = list(names)
        if not any((rule := self.rule_for(n)) is not None and rule.method != KEEP for n in names):
            raise InputError("the recipe matches no compressible layer: " + ", ".join(r.match for r in self.rules))

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [r.to_dict() for r in self.rules]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        if not isinstance(d, dict) or not isinstance(d.get("rules"), list):
            raise InputError("a recipe is a mapping with a list under 'rules'")
        rules = []
        for i, r in enumerate(d["rules"]):
            if not isinstance(r, dict) or "match" not in r or "method" not in r:
                raise InputError(f"recipe rule {i} needs 'match' and 'method': {r!r}")
            r = dict(r)
            rules.append(Rule(match=str(r.pop("match")), method=str(r.pop("method")), params=r))
        return cls(rules)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))

    @classmethod
    def uniform(cls, method: str, keep: str = r"lm_head|embed|wte|wpe|(^|\.)shared($|\.)", **params: Any) -> "Recipe":
        """The recipe behind ``--method M --bits B ...``: keep embeddings and head, M elsewhere."""
        return cls([Rule(keep, KEEP), Rule(".*", method, {k: v for k, v in params.items() if v is not None})])
