"""Parsing tool calls, validating arguments, running tools, converting and truncating results."""
import json

import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from axpo.tools import (ERROR_KINDS, Tool, ToolCall, ToolContext, ToolRegistry, ToolResult,
                        default_registry, parse_tool_call)
from axpo.tools.registry import MAX_CALL_CHARS, check_schema, validate_arguments


# --- parse_tool_call ---------------------------------------------------------------------------

def test_parse_valid_call():
    call = parse_tool_call('{"name": "zoom", "arguments": {"bbox_2d": [1, 2, 3, 4]}}')
    assert call == ToolCall("zoom", {"bbox_2d": [1, 2, 3, 4]})


def test_parse_tolerates_whitespace_and_newlines():
    call = parse_tool_call('\n  {"name": "python",\n "arguments": {"code": "print(1)\\nprint(2)"}}  \n\t')
    assert call == ToolCall("python", {"code": "print(1)\nprint(2)"})


def test_parse_arguments_as_json_string():
    call = parse_tool_call(json.dumps({"name": "f", "arguments": json.dumps({"a": 1})}))
    assert call == ToolCall("f", {"a": 1})


@pytest.mark.parametrize("text", ['{"name": "f"}', '{"name": "f", "arguments": ""}',
                                  '{"name": "f", "arguments": null}'])
def test_parse_missing_or_empty_arguments_mean_none(text):
    assert parse_tool_call(text) == ToolCall("f", {})


def test_parse_parameters_alias_and_wrappers():
    assert parse_tool_call('{"name": "f", "parameters": {"a": 1}}') == ToolCall("f", {"a": 1})
    assert parse_tool_call('<tool_call>{"name": "f"}</tool_call>') == ToolCall("f", {})
    assert parse_tool_call('```json\n{"name": "f", "arguments": {"a": 2}}\n```') == ToolCall("f", {"a": 2})
    # "arguments" wins over "parameters"; unknown top-level keys are ignored
    assert parse_tool_call('{"name": "f", "arguments": {"a": 1}, "parameters": {"b": 2}, "id": 7}') \
        == ToolCall("f", {"a": 1})


@pytest.mark.parametrize("text, fragment", [
    ('{"name": "f", "arguments": {', "not valid JSON"),
    ("name: f", "not valid JSON"),
    ("", "empty"),
    ("   \n", "empty"),
    ('[{"name": "f"}]', "got array"),
    ('"f"', "got string"),
    ("42", "got number"),
    ('{"arguments": {}}', 'no "name"'),
    ('{"name": 3, "arguments": {}}', '"name" = 3'),
    ('{"name": null}', '"name" = null'),
    ('{"name": "  "}', "non-empty string"),
    ('{"name": "f", "arguments": [1, 2]}', "got array"),
    ('{"name": "f", "arguments": "not json"}', "does not hold valid JSON"),
    ('{"name": "f", "arguments": "[1]"}', "got array"),
    ('{"name": "f", "arguments": {"a": ' + "1" * 5000 + "}}", "not valid JSON"),  # int too long
    ("[" * 100_000 + "]" * 100_000, "characters long"),
    ("[" * 30_000 + "]" * 30_000, "not valid JSON"),  # deep nesting: RecursionError
])
def test_parse_malformed(text, fragment):
    result = parse_tool_call(text)
    assert isinstance(result, ToolResult)
    assert result.error == "malformed_call" and not result.ok
    assert result.text.startswith("Error (malformed_call): ")
    assert fragment in result.text


def test_parse_refuses_huge_input_unparsed():
    text = '{"name": "f", "arguments": {"x": "' + "a" * MAX_CALL_CHARS + '"}}'
    result = parse_tool_call(text)
    assert result.error == "malformed_call" and str(MAX_CALL_CHARS) in result.text


@pytest.mark.parametrize("value", [None, b'{"name": "f"}', 3, {"name": "f"}])
def test_parse_non_text(value):
    assert parse_tool_call(value).error == "malformed_call"


# --- the schema validator ----------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 10},
        "x": {"type": "number", "exclusiveMinimum": 0},
        "mode": {"type": "string", "enum": ["fast", "slow"]},
        "flag": {"type": "boolean"},
        "box": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 3},
        "name": {"type": "string", "minLength": 1, "maxLength": 5},
        "maybe": {"type": ["string", "null"]},
        "inner": {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"],
                  "additionalProperties": False},
    },
    "required": ["n"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("arguments, fragment", [
    ({}, 'missing the required property "n"'),
    ({"n": "3"}, "arguments.n must be an integer"),
    ({"n": True}, "arguments.n must be an integer"),  # booleans are not integers
    ({"n": 1.0}, "arguments.n must be an integer"),  # strict: 1.0 is a number, not an integer
    ({"n": -1}, "arguments.n must be >= 0"),
    ({"n": 11}, "arguments.n must be <= 10"),
    ({"n": 1, "x": 0}, "arguments.x must be > 0"),
    ({"n": 1, "x": float("nan")}, "finite"),
    ({"n": 1, "x": float("inf")}, "finite"),
    ({"n": 1, "x": False}, "arguments.x must be a number"),
    ({"n": 1, "mode": "medium"}, "arguments.mode must be one of"),
    ({"n": 1, "flag": 1}, "arguments.flag must be a boolean"),
    ({"n": 1, "box": [1]}, "at least 2 items"),
    ({"n": 1, "box": [1, 2, 3, 4]}, "at most 3 items"),
    ({"n": 1, "box": [1, "2"]}, "arguments.box[1] must be a number"),
    ({"n": 1, "box": "1,2"}, "arguments.box must be an array"),
    ({"n": 1, "name": ""}, "at least 1 characters"),
    ({"n": 1, "name": "abcdef"}, "at most 5 characters"),
    ({"n": 1, "maybe": 3}, "string or null"),
    ({"n": 1, "inner": {}}, 'arguments.inner is missing the required property "k"'),
    ({"n": 1, "inner": {"k": 1, "j": 2}}, 'unknown property "j"'),
    ({"n": 1, "extra": 0}, 'unknown property "extra"'),
])
def test_validator_rejects(arguments, fragment):
    message = validate_arguments(arguments, SCHEMA)
    assert message is not None and fragment in message, message


def test_validator_accepts():
    good = {"n": 0, "x": 1e-9, "mode": "slow", "flag": False, "box": [1, 2.5], "name": "ab",
            "maybe": None, "inner": {"k": 3}}
    assert validate_arguments(good, SCHEMA) is None
    assert validate_arguments({"n": 10, "box": [0, 0, 0], "maybe": "s"}, SCHEMA) is None
    assert validate_arguments(1.0, {"type": "number", "enum": [1]}) is None  # JSON: 1 == 1.0
    assert validate_arguments(True, {"enum": [1]}) is not None  # but true != 1


@pytest.mark.parametrize("schema, error", [
    ([], TypeError),
    ({"type": "tuple"}, ValueError),
    ({"type": "string", "pattern": "a+"}, ValueError),  # unsupported: refused, not ignored
    ({"type": "object", "properties": {"a": {"oneOf": []}}}, ValueError),
    ({"type": "object", "required": "a"}, ValueError),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, ValueError),
    ({"type": "integer", "minimum": "0"}, ValueError),
    ({"type": "array", "minItems": -1}, ValueError),
    ({"type": "object", "properties": []}, TypeError),
    ({"enum": []}, ValueError),
])
def test_check_schema_refuses(schema, error):
    with pytest.raises(error, match="schema"):
        check_schema(schema)


# --- the registry ------------------------------------------------------------------------------

def echo(context, n, **rest):
    return f"n={n}"


def make_registry(**kwargs):
    registry = ToolRegistry(**kwargs)
    registry.register("echo", echo, SCHEMA, description="echo n")
    return registry


def call(name, **arguments):
    return json.dumps({"name": name, "arguments": arguments})


def test_execute_success_sets_call():
    result = make_registry().execute(call("echo", n=3), ToolContext())
    assert result.ok and result.text == "n=3" and result.images == []
    assert result.call == ToolCall("echo", {"n": 3})


def test_execute_accepts_parsed_call_and_no_context():
    assert make_registry().execute(ToolCall("echo", {"n": 1})).text == "n=1"


def test_unknown_tool_lists_available():
    result = make_registry().execute(call("zoomm", n=1))
    assert result.error == "unknown_tool"
    assert '"zoomm"' in result.text and "echo" in result.text and result.call.name == "zoomm"


@pytest.mark.parametrize("arguments", [{}, {"n": "1"}, {"n": True}, {"n": 1, "zzz": 2},
                                       {"n": 1, "mode": "x"}, {"n": 99}, {"n": 1, "box": [1]}])
def test_bad_arguments_never_reach_the_tool(arguments):
    calls = []
    registry = ToolRegistry()
    registry.register("t", lambda context, **kw: calls.append(kw) or "ran", SCHEMA)
    result = registry.execute(json.dumps({"name": "t", "arguments": arguments}))
    assert result.error == "bad_arguments" and result.text.startswith("Error (bad_arguments): arguments")
    assert calls == []


def test_tool_exception_is_reported_and_registry_keeps_working():
    registry = make_registry()

    @registry.register("boom", schema={"type": "object", "properties": {}})
    def boom(context):
        raise KeyError("secret-key")

    result = registry.execute('{"name": "boom"}')
    assert result.error == "tool_exception"
    assert "KeyError" in result.text and "secret-key" in result.text
    assert "Traceback" not in result.text and __file__ not in result.text
    assert registry.execute(call("echo", n=2)).text == "n=2"


def test_tool_with_unexpected_argument_name_is_a_tool_exception():
    # additionalProperties defaults to true: an unknown keyword reaches fn, which raises TypeError
    registry = ToolRegistry()
    registry.register("f", lambda context, a=0: str(a), {"type": "object"})
    assert registry.execute(call("f", b=1)).error == "tool_exception"
    assert registry.execute(call("f", context=1)).error == "tool_exception"


def test_result_conversions():
    image = Image.new("RGB", (4, 4))
    returns = {
        "s": "text",
        "i": image,
        "t": ("two", [image, image]),
        "t1": ("one", image),
        "r": ToolResult("custom", [image], error="bad_arguments"),
        "bad": 42,
        "badlist": ("x", [1]),
    }
    registry = ToolRegistry()
    for name, value in returns.items():
        registry.register(name, lambda context, value=value: value, {"type": "object", "properties": {},
                                                                     "additionalProperties": False})
    r = {name: registry.execute(json.dumps({"name": name})) for name in returns}
    assert (r["s"].text, r["s"].images, r["s"].ok) == ("text", [], True)
    assert r["i"].images == [image] and r["i"].ok
    assert r["t"].text == "two" and r["t"].images == [image, image]
    assert r["t1"].images == [image]
    assert r["r"].text == "custom" and r["r"].error == "bad_arguments" and r["r"].call.name == "r"
    assert r["bad"].error == "tool_exception" and "int" in r["bad"].text
    assert r["badlist"].error == "tool_exception"


def test_truncation():
    registry = ToolRegistry(max_result_chars=500)
    registry.register("long", lambda context, n: "x" * n, {"type": "object", "properties": {"n": {"type": "integer"}}})
    short = registry.execute(call("long", n=500))
    assert short.text == "x" * 500
    long = registry.execute(call("long", n=10_000))
    assert len(long.text) <= 500 and long.text.startswith("x" * 400)
    cut = 10_000 - long.text.index("\n")
    assert long.text.endswith(f"[truncated {cut} characters]")


@pytest.mark.parametrize("make, error, fragment", [
    (lambda: Tool("bad name", echo, SCHEMA), ValueError, "name"),
    (lambda: Tool("", echo, SCHEMA), ValueError, "name"),
    (lambda: Tool("x" * 65, echo, SCHEMA), ValueError, "name"),
    (lambda: Tool(3, echo, SCHEMA), ValueError, "name"),
    (lambda: Tool("t", "not callable", SCHEMA), TypeError, "fn"),
    (lambda: Tool("t", echo, {"type": "array"}), ValueError, "schema"),
    (lambda: Tool("t", echo, None), TypeError, "schema"),
    (lambda: Tool("t", echo, {"type": "object", "properties": {"a": {"type": "str"}}}), ValueError,
     "schema.properties.a"),
    (lambda: Tool("t", echo, SCHEMA, description=None), TypeError, "description"),
    (lambda: make_registry().register("echo", echo, SCHEMA), ValueError, "already registered"),
    (lambda: ToolRegistry().add(echo), TypeError, "tool"),
    (lambda: ToolRegistry().register("t", echo), TypeError, "schema"),
    (lambda: ToolRegistry(max_result_chars=0), ValueError, "max_result_chars"),
    (lambda: ToolResult.failure("oops", "x"), ValueError, "kind"),
])
def test_programmer_errors_raise(make, error, fragment):
    with pytest.raises(error, match=fragment):
        make()


def test_specs_and_names():
    registry = make_registry()
    assert registry.names() == ["echo"] and "echo" in registry and len(registry) == 1
    assert registry.specs() == [{"type": "function", "function": {"name": "echo", "description": "echo n",
                                                                  "parameters": SCHEMA}}]
    json.dumps(registry.specs())


def test_error_kinds_and_result_helpers():
    assert set(ERROR_KINDS) >= {"malformed_call", "unknown_tool", "bad_arguments", "tool_exception",
                                "timeout", "memory_limit", "sandbox_violation", "crashed"}
    result = ToolResult.failure("timeout", "too slow")
    assert result.text == "Error (timeout): too slow" and not result.ok and result.images == []
    assert ToolResult("fine").ok and ToolContext().images == []


def test_default_registry():
    registry = default_registry()
    assert registry.names() == ["zoom", "python"]
    assert [s["function"]["name"] for s in registry.specs()] == ["zoom", "python"]
    json.dumps(registry.specs())
    assert default_registry(python=False).names() == ["zoom"]
    assert default_registry(zoom=False, timeout_s=1.0).names() == ["python"]
    assert default_registry(max_result_chars=123, min_side=8).max_result_chars == 123
    with pytest.raises(TypeError):
        default_registry(python=False, timeout_s=1.0)
    with pytest.raises(TypeError):
        default_registry(no_such_limit=1)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(max_size=200),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                 lambda children: st.lists(children, max_size=4)
                 | st.dictionaries(st.sampled_from(["name", "arguments", "parameters", "n", "box"]), children,
                                   max_size=4), max_leaves=20).map(json.dumps),
    st.fixed_dictionaries({"name": st.sampled_from(["echo", "boom", "x"]),
                           "arguments": st.dictionaries(st.sampled_from(list(SCHEMA["properties"]) + ["z"]),
                                                        st.none() | st.integers() | st.floats() | st.text(max_size=5)
                                                        | st.lists(st.integers(), max_size=4))}).map(json.dumps),
))
def test_execute_never_raises_on_model_output(text):
    result = make_registry().execute(text)
    assert isinstance(result, ToolResult) and isinstance(result.text, str)
    assert result.error is None or result.error in ERROR_KINDS
    assert result.ok == (result.error is None)
