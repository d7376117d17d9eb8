"""Placement rules: a YAML list parsed with the safe loader into frozen, validated dataclasses.

A rules file never names Python: `replace.op` is looked up in the op registry, and everything
else is plain data. Every mistake is reported with the file, the rule's index and its line. Regexes run
on the `regex` engine with a time limit per match, so a pattern that backtracks catastrophically is a
clear error, not a hang.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import regex
import yaml

from hetero_moe.ops.registry import OPS, OpSpec

DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")
REGEX_TIMEOUT_S = 0.5  # one match of a rule's regex against one name; real names take microseconds
RULE_KEYS = frozenset({"match", "replace", "recursive", "optional"})
MATCH_KEYS = frozenset({"name", "class"})
REPLACE_KEYS = frozenset({"op", "device", "kwargs"})


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file, rule and line."""


@dataclass(frozen=True)
class Match:
    name: regex.Pattern | None
    cls: regex.Pattern | None

    def __call__(self, module_name: str, class_name: str) -> bool:
        """Whether both given patterns hold; `TimeoutError` if one runs past `REGEX_TIMEOUT_S`."""
        if self.name is not None and self.name.search(module_name, timeout=REGEX_TIMEOUT_S) is None:
            return False
        return self.cls is None or self.cls.fullmatch(class_name, timeout=REGEX_TIMEOUT_S) is not None


@dataclass(frozen=True)
class Replace:
    op: OpSpec | None
    device: str | None
    kwargs: Any  # the op's frozen kwargs dataclass, or None when op is None


@dataclass(frozen=True)
class Rule:
    match: Match
    replace: Replace
    recursive: bool
    index: int
    line: int
    source: str
    optional: bool = False  # matching no module is expected (a part some architectures lack): no warning

    @property
    def where(self) -> str:
        return f"{self.source}: rule {self.index} (line {self.line})"


@dataclass(frozen=True)
class Rules:
    rules: tuple[Rule, ...]
    source: str
    text: str = field(repr=False, default="")

    def first_match(self, module_name: str, class_name: str) -> Rule | None:
        for rule in self.rules:
            try:
                if rule.match(module_name, class_name):
                    return rule
            except TimeoutError as e:
                raise RulesError(
                    f"{rule.where}: matching {module_name!r} ({class_name}) took over {REGEX_TIMEOUT_S} s; "
                    "the regex backtracks catastrophically (nested quantifiers such as '(a+)+'): simplify it"
                ) from e
        return None


def builtin_rules() -> list[str]:
    """Names of the rules files shipped inside the package."""
    return sorted(p.name for p in resources.files("hetero_moe.rules").iterdir() if p.name.endswith(".yaml"))


def resolve_rules_path(name_or_path: str | Path) -> Path:
    """A path to an existing file wins; otherwise a bare name resolves to a built-in rules file."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.name == str(name_or_path):
        for candidate in (str(name_or_path), f"{name_or_path}.yaml"):
            builtin = resources.files("hetero_moe.rules") / candidate
            if builtin.is_file():
                return Path(str(builtin))
    raise RulesError(f"rules file {str(name_or_path)!r} not found; built-in rules: {', '.join(builtin_rules())}")


def load_rules(name_or_path: str | Path) -> Rules:
    path = resolve_rules_path(name_or_path)
    return parse_rules(path.read_text(encoding="utf-8"), source=str(path))


def parse_rules(text: str, source: str = "<rules>", ops: Mapping[str, OpSpec] = OPS) -> Rules:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RulesError(f"{source}: not valid YAML: {e}") from e
    if data is None:
        raise RulesError(f"{source}: the file holds no rules (expected a YAML list of rules)")
    if not isinstance(data, list) or not isinstance(root, yaml.SequenceNode):
        raise RulesError(f"{source}: expected a YAML list of rules, got {type(data).__name__}")
    rules = tuple(
        _parse_rule(item, index=i, line=node.start_mark.line + 1, source=source, ops=ops)
        for i, (item, node) in enumerate(zip(data, root.value, strict=True))
    )
    return Rules(rules=rules, source=source, text=text)


def _parse_rule(item: object, *, index: int, line: int, source: str, ops: Mapping[str, OpSpec]) -> Rule:
    where = f"{source}: rule {index} (line {line})"

    def fail(msg: str) -> RulesError:
        return RulesError(f"{where}: {msg}")

    if not isinstance(item, dict):
        raise fail(f"a rule is a mapping with keys {sorted(RULE_KEYS)}, got {type(item).__name__}")
    _check_keys(item, RULE_KEYS, "rule", fail)
    if "match" not in item:
        raise fail("missing 'match'")

    match = item["match"]
    if not isinstance(match, dict):
        raise fail("'match' must be a mapping with 'name' and/or 'class'")
    _check_keys(match, MATCH_KEYS, "match", fail)
    if not match:
        raise fail("'match' needs at least one of 'name' (regex over the module name) or 'class'")
    name_re = _regex(match.get("name"), "match.name", fail)
    cls_re = _regex(match.get("class"), "match.class", fail)

    replace = item.get("replace", {})
    if not isinstance(replace, dict):
        raise fail("'replace' must be a mapping with 'op', 'device' and/or 'kwargs'")
    _check_keys(replace, REPLACE_KEYS, "replace", fail)
    op_name, device, kwargs = replace.get("op"), replace.get("device"), replace.get("kwargs")

    spec: OpSpec | None = None
    if op_name is not None:
        if not isinstance(op_name, str) or op_name not in ops:
            raise fail(f"unknown op {op_name!r}; known ops: {', '.join(sorted(ops))}")
        spec = ops[op_name]
    if device is not None and (not isinstance(device, str) or not DEVICE_RE.match(device)):
        raise fail(f"bad device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    if kwargs is not None and spec is None:
        raise fail("'kwargs' given without an 'op' to receive them")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise fail("'kwargs' must be a mapping")
    parsed_kwargs = None
    if spec is not None:
        try:
            parsed_kwargs = spec.parse_kwargs(kwargs or {})
        except (TypeError, ValueError) as e:
            raise fail(f"bad kwargs for op {spec.name!r}: {e}") from e

    recursive, optional = item.get("recursive", True), item.get("optional", False)
    for key, value in (("recursive", recursive), ("optional", optional)):
        if not isinstance(value, bool):
            raise fail(f"{key!r} must be true or false, got {value!r}")
    if spec is None and device is None:
        raise fail("'replace' needs an 'op', a 'device' or both")
    return Rule(
        match=Match(name=name_re, cls=cls_re),
        replace=Replace(op=spec, device=device, kwargs=parsed_kwargs),
        recursive=recursive,
        index=index,
        line=line,
        source=source,
        optional=optional,
    )


def _check_keys(mapping: dict, allowed: frozenset[str], what: str, fail) -> None:
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        raise fail(f"unknown key(s) {unknown} in {what}; allowed: {sorted(allowed)}")


def _regex(value: object, what: str, fail) -> regex.Pattern | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise fail(f"{what} must be a string (a regular expression), got {type(value).__name__}")
    try:
        return regex.compile(value)
    except regex.error as e:
        raise fail(f"{what} {value!r} is not a valid regular expression: {e}") from e
