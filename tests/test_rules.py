"""Rules files: every mistake is a clear error naming the file, the rule and its line."""

from __future__ import annotations

import pytest

from hetero_moe.inject.rules import RulesError, builtin_rules, load_rules, parse_rules


def check(text: str, *fragments: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(text, source="my.yaml")
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_builtin_rules_parse() -> None:
    names = builtin_rules()
    for expected in (
        "cpu-only.yaml",
        "gpu-exact.yaml",
        "deepseek-v3.yaml",
        "deepseek-v3-int4-gpu.yaml",
        "deepseek-v2-lite.yaml",
        "qwen3-moe.yaml",
        "mixtral.yaml",
    ):
        assert expected in names
    for name in names:
        assert load_rules(name).rules
    assert load_rules("cpu-only").source.endswith("cpu-only.yaml")


def test_path_wins_and_unknown_name_lists_builtins(tmp_path) -> None:
    own = tmp_path / "mine.yaml"
    own.write_text("- match: {name: '^$'}\n  replace: {device: cpu}\n")
    assert load_rules(own).source == str(own)
    with pytest.raises(RulesError, match="built-in rules: .*cpu-only.yaml"):
        load_rules("no-such-rules.yaml")


def test_parsed_fields_and_line_numbers() -> None:
    rules = parse_rules(
        "# comment\n"
        "- match: {name: 'experts$', class: DeepseekV3Experts}\n"
        "  replace: {op: experts, device: cpu}\n"
        "  recursive: false\n"
        "\n"
        "- match:\n"
        "    name: '^$'\n"
        "  replace:\n"
        "    device: cuda\n",
        source="r.yaml",
    )
    first, second = rules.rules
    assert (first.index, first.line, second.index, second.line) == (0, 2, 1, 6)
    assert first.replace.op.name == "experts" and first.recursive is False
    assert second.replace.op is None and second.replace.device == "cuda" and second.recursive is True
    assert first.match("model.layers.3.mlp.experts", "DeepseekV3Experts")
    assert not first.match("model.layers.3.mlp.experts", "Qwen3MoeExperts")  # both must hold
    assert rules.first_match("", "DeepseekV3ForCausalLM") is second


def test_class_is_a_full_match() -> None:
    rules = parse_rules("- match: {class: 'Deepseek.*MoE|DeepseekV2Moe'}\n  replace: {op: moe}\n")
    assert rules.rules[0].match("x", "DeepseekV3MoE") and rules.rules[0].match("x", "DeepseekV2Moe")
    assert not rules.rules[0].match("x", "DeepseekV3MoEX")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            "- match: {name: x}\n  replace: {device: cpu}\n  recurse: false\n",
            ["rule 0 (line 1)", "unknown key", "recurse"],
        ),
        ("- match: {nme: x}\n  replace: {device: cpu}\n", ["unknown key", "nme", "match"]),
        ("- match: {name: x}\n  replace: {devise: cpu}\n", ["unknown key", "devise"]),
        ("- match: {name: 'a(b'}\n  replace: {device: cpu}\n", ["not a valid regular expression", "a(b"]),
        ("- match: {class: '*x'}\n  replace: {device: cpu}\n", ["match.class"]),
        ("- match: {name: x}\n  replace: {op: nope}\n", ["unknown op 'nope'", "known ops:", "attention", "experts"]),
        ("- match: {name: x}\n  replace: {op: experts, kwargs: {quant: int4}}\n", ["bad kwargs", "quant", "accepted"]),
        ("- match: {name: x}\n  replace: {device: gpu}\n", ["bad device 'gpu'"]),
        ("- match: {name: x}\n  replace: {device: 'cuda:x'}\n", ["bad device"]),
        ("- match: {name: x}\n  replace: {kwargs: {a: 1}, device: cpu}\n", ["'kwargs' given without an 'op'"]),
        ("- match: {name: x}\n", ["needs an 'op', a 'device'"]),
        ("- replace: {device: cpu}\n", ["missing 'match'"]),
        ("- match: {}\n  replace: {device: cpu}\n", ["at least one of"]),
        ("- match: {name: x}\n  replace: {device: cpu}\n  recursive: maybe\n", ["'recursive' must be true or false"]),
        ("- match: {name: x}\n  replace: {device: cpu}\n  optional: 1\n", ["'optional' must be true or false"]),
        ("- match: {name: 3}\n  replace: {device: cpu}\n", ["match.name must be a string"]),
        ("- just a string\n", ["a rule is a mapping"]),
        ("match: {name: x}\n", ["expected a YAML list"]),
        ("", ["holds no rules"]),
        ("- match: {name: x\n", ["not valid YAML"]),
    ],
)
def test_mistakes_are_clear_errors(text: str, fragments: list[str]) -> None:
    check(text, "my.yaml", *fragments)


def test_later_rule_errors_name_their_index_and_line() -> None:
    text = "- match: {name: '^$'}\n  replace: {device: cpu}\n- match: {name: x}\n  replace: {op: atention}\n"
    check(text, "rule 1 (line 3)", "unknown op 'atention'")


def test_yaml_cannot_construct_python_objects() -> None:
    check("- !!python/object/apply:os.system ['echo hi']\n", "not valid YAML")


def test_catastrophic_regex_is_a_clear_error_not_a_hang(tiny, tmp_path) -> None:
    from hetero_moe.llm import place

    model = tiny("DeepseekV3ForCausalLM").path
    shipped = load_rules("cpu-only.yaml").text
    rules = tmp_path / "nested.yaml"
    # the pattern of the report: exponential for Python's re on every module name; the regex engine is linear here
    rules.write_text("- match: {name: '^([a-z_0-9]+\\.?)+!$'}\n  replace: {device: cpu}\n" + shipped)
    assert any("rule 0" in w for w in place(model, rules, "float32").warnings)  # it matches nothing: a warning
    # one that backtracks on the regex engine too: stopped by the time limit, named with its rule and line
    rules.write_text("- match: {name: '^(.|..)+\\d$'}\n  replace: {device: cpu}\n" + shipped)
    with pytest.raises(RulesError, match=r"nested.yaml: rule 0 \(line 1\): matching 'model.* took over .* backtracks"):
        place(model, rules, "float32")
