"""Loading rules files (YAML) into a compiled `RuleSet`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from schemas.rules import RulesError, RulesFile, rules_from_data
from triggers.ruleset import RuleSet, compile_rules

PACKAGED = ("default", "demo")


def packaged_rules_path(name: str = "default") -> Path:
    return Path(str(resources.files("omnicue") / "rulesets" / f"{name}.yaml"))


def parse_rules_text(text: str, source: str = "rules file") -> RulesFile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(f"{source}: not valid YAML: {exc}") from None
    return rules_from_data(data, source)


def read_rules_file(path: Path | None) -> RulesFile:
    path = path or packaged_rules_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"{path}: cannot read rules file: {exc.strerror}") from None
    return parse_rules_text(text, str(path))


def load_rules(path: Path | None) -> RuleSet:
    """Validate and compile; raises `RulesError` naming the rule and field."""
    return compile_rules(read_rules_file(path))
