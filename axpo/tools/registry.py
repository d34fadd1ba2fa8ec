"""Tool calls: parsing the model's `<tool_call>` text, validating arguments, running tools.

The model's output is untrusted input: `parse_tool_call` and `ToolRegistry.execute` never raise
on it. Every failure becomes a `ToolResult` whose `error` is one of `ERROR_KINDS` and whose `text`
("Error (<kind>): <message>") is shown to the model so that it can correct itself. Mistakes of the
*programmer* (registering a tool with a bad name, function or schema) raise TypeError/ValueError.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

__all__ = ["ERROR_KINDS", "MAX_CALL_CHARS", "ToolCall", "ToolContext", "ToolResult", "Tool",
           "ToolRegistry", "parse_tool_call", "validate_arguments", "check_schema"]

# The error kinds, in the order a call can fail. See the axpo.tools docstring for each one's meaning.
ERROR_KINDS = ("malformed_call", "unknown_tool", "bad_arguments", "tool_exception", "timeout",
               "memory_limit", "sandbox_violation", "crashed")

MAX_CALL_CHARS = 64 * 1024  # a longer <tool_call> body is refused unparsed (JSON parsing is not free)

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # the OpenAI function-name rule
_TRUNCATION_MARKER = "\n...[truncated {n} characters]"


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: the tool's name and its arguments object."""
    name: str
    arguments: dict


@dataclass
class ToolContext:
    """What a tool may look at besides its arguments.

    images: the images of the conversation so far, in order (index 0 is the question's image,
        then every image a tool returned). Tools read them; the agent loop appends to them.
    """
    images: list = field(default_factory=list)


@dataclass
class ToolResult:
    """The outcome of one call.

    text: what the model is shown: the tool's output, or "Error (<kind>): <message>".
    images: images returned to the model (appended to the conversation by the agent loop).
    error: None on success, else one of ERROR_KINDS.
    call: the parsed call (None when the text could not be parsed).
    """
    text: str
    images: list = field(default_factory=list)
    error: str | None = None
    call: ToolCall | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failure(cls, kind: str, message: str, call: ToolCall | None = None) -> "ToolResult":
        """An error result whose text is "Error (<kind>): <message>"."""
        if kind not in ERROR_KINDS:
            raise ValueError(f"kind must be one of {ERROR_KINDS}, got {kind!r}")
        return cls(text=f"Error ({kind}): {message}", error=kind, call=call)


# ---------------------------------------------------------------------------------------------
# Parsing

def _describe(value: Any, limit: int = 60) -> str:
    """A short, safe rendering of an untrusted value for error messages."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _strip_wrapping(text: str) -> str:
    """Tolerate the tags themselves and a markdown code fence around the JSON."""
    text = text.strip()
    if text.startswith("<tool_call>") and text.endswith("</tool_call>"):
        text = text[len("<tool_call>"):-len("</tool_call>")].strip()
    if text.startswith("```") and text.endswith("```") and len(text) >= 6:
        text = text[3:-3]
        if text.startswith("json"):
            text = text[4:]
        text = text.strip()
    return text


def parse_tool_call(text: str) -> ToolCall | ToolResult:
    """Parse the body of a `<tool_call>...</tool_call>` block.

    Accepted: a JSON object with a non-empty string "name" and an "arguments" object. "arguments"
    may also be a JSON string holding an object (OpenAI style) or be missing (= {}); "parameters"
    is accepted as an alias when "arguments" is absent. Other top-level keys (e.g. "id") are
    ignored. Surrounding whitespace, the tags themselves and a ```json fence are tolerated.

    Returns a ToolCall, or a ToolResult with error "malformed_call" (never raises on bad input).
    Text longer than MAX_CALL_CHARS is refused without parsing.
    """
    def malformed(message: str) -> ToolResult:
        return ToolResult.failure("malformed_call", message + ' Expected {"name": <tool name>, '
                                  '"arguments": {...}}.')

    if not isinstance(text, str):
        return malformed(f"the tool call must be text, got {type(text).__name__}.")
    if len(text) > MAX_CALL_CHARS:
        return malformed(f"the tool call is {len(text)} characters long; the limit is {MAX_CALL_CHARS}.")
    body = _strip_wrapping(text)
    if not body:
        return malformed("the tool call is empty.")
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return malformed(f"the tool call is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).")
    except (ValueError, RecursionError) as e:  # e.g. an integer too long to convert, deep nesting
        return malformed(f"the tool call is not valid JSON ({type(e).__name__}: {str(e)[:100]}).")
    if not isinstance(obj, dict):
        return malformed(f"the tool call must be a JSON object, got {_json_type(obj)}.")
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        got = "no \"name\"" if "name" not in obj else f"\"name\" = {_describe(name)}"
        return malformed(f"the tool call needs a non-empty string \"name\", got {got}.")
    key = "arguments" if "arguments" in obj else "parameters" if "parameters" in obj else None
    arguments = {} if key is None else obj[key]
    if isinstance(arguments, str):
        if not arguments.strip():
            arguments = {}
        else:
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                return malformed(f"\"{key}\" is a string that does not hold valid JSON.")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return malformed(f"\"{key}\" must be a JSON object, got {_json_type(arguments)}.")
    return ToolCall(name=name.strip(), arguments=arguments)


# ---------------------------------------------------------------------------------------------
# A small JSON-schema validator: the subset tool schemas need.

_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
_ANNOTATIONS = {"description", "title", "default", "examples"}
_KEYWORDS = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"minLength", "maxLength"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "boolean": set(),
    "null": set(),
}


def _is_type(value: Any, type_name: str) -> bool:
    if type_name == "object":
        return isinstance(value, dict)
    if type_name == "array":
        return isinstance(value, list)
    if type_name == "string":
        return isinstance(value, str)
    if type_name == "integer":  # booleans are not integers, and 1.0 is not either (strict)
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_name == "boolean":
        return isinstance(value, bool)
    return value is None


def _same_json_value(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true != 1."""
    if _is_type(a, "number") and _is_type(b, "number"):
        return a == b
    return type(a) is type(b) and a == b


def check_schema(schema: Any, where: str = "schema") -> None:
    """Raise ValueError/TypeError unless `schema` uses only the supported JSON-schema subset.

    Supported: type (one name or a list), properties, required, additionalProperties (bool or a
    schema), enum, minimum, maximum, exclusiveMinimum, exclusiveMaximum, minItems, maxItems, items,
    minLength, maxLength; annotations (description, title, default, examples) are ignored.
    Anything else is refused rather than silently not enforced.
    """
    if not isinstance(schema, dict):
        raise TypeError(f"{where} must be a dict (a JSON schema), got {type(schema).__name__}")
    types = schema.get("type")
    if types is None:
        type_list: list[str] = []
    elif isinstance(types, str):
        type_list = [types]
    elif isinstance(types, list) and types and all(isinstance(t, str) for t in types):
        type_list = list(types)
    else:
        raise ValueError(f"{where}.type must be a type name or a non-empty list of them, got {types!r}")
    for t in type_list:
        if t not in _TYPES:
            raise ValueError(f"{where}.type {t!r} is not one of {_TYPES}")
    allowed = {"type", "enum"} | _ANNOTATIONS
    for t in type_list or _TYPES:
        allowed |= _KEYWORDS[t]
    for key in schema:
        if key not in allowed:
            raise ValueError(f"{where} has keyword {key!r}, which is not supported for type "
                             f"{types!r} (supported: {sorted(allowed)})")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise ValueError(f"{where}.enum must be a non-empty list")
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if key in schema and not _is_type(schema[key], "number"):
            raise ValueError(f"{where}.{key} must be a number, got {schema[key]!r}")
    for key in ("minItems", "maxItems", "minLength", "maxLength"):
        if key in schema and not (_is_type(schema[key], "integer") and schema[key] >= 0):
            raise ValueError(f"{where}.{key} must be a non-negative integer, got {schema[key]!r}")
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise TypeError(f"{where}.properties must be a dict, got {type(props).__name__}")
    for name, sub in props.items():
        check_schema(sub, f"{where}.properties.{name}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ValueError(f"{where}.required must be a list of property names, got {required!r}")
    extra = schema.get("additionalProperties", True)
    if not isinstance(extra, bool):
        check_schema(extra, f"{where}.additionalProperties")
    if extra is False:
        missing = [r for r in required if r not in props]
        if missing:
            raise ValueError(f"{where}.required names {missing}, which are not in properties while "
                             "additionalProperties is false: no value could ever be valid")
    if "items" in schema:
        check_schema(schema["items"], f"{where}.items")


def validate_arguments(value: Any, schema: dict, where: str = "arguments") -> str | None:
    """Check `value` against a schema accepted by `check_schema`.

    Returns None when valid, else a one-line message for the model naming the offending path
    (e.g. "arguments.bbox_2d[2] must be a number, got \"a\"").
    """
    types = schema.get("type")
    if types is not None:
        type_list = [types] if isinstance(types, str) else types
        if not any(_is_type(value, t) for t in type_list):
            expected = " or ".join(type_list)
            return f"{where} must be {'an' if expected[0] in 'aeiou' else 'a'} {expected}, got {_describe(value)}"
    if "enum" in schema and not any(_same_json_value(value, v) for v in schema["enum"]):
        return f"{where} must be one of {_describe(schema['enum'], 200)}, got {_describe(value)}"
    if _is_type(value, "number"):
        if isinstance(value, float) and not math.isfinite(value):
            return f"{where} must be a finite number, got {value}"
        if "minimum" in schema and value < schema["minimum"]:
            return f"{where} must be >= {schema['minimum']}, got {value}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{where} must be <= {schema['maximum']}, got {value}"
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            return f"{where} must be > {schema['exclusiveMinimum']}, got {value}"
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            return f"{where} must be < {schema['exclusiveMaximum']}, got {value}"
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            return f"{where} must have at least {schema['minLength']} characters, got {len(value)}"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{where} must have at most {schema['maxLength']} characters, got {len(value)}"
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            return f"{where} must have at least {schema['minItems']} items, got {len(value)}"
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return f"{where} must have at most {schema['maxItems']} items, got {len(value)}"
        if "items" in schema:
            for i, item in enumerate(value):
                message = validate_arguments(item, schema["items"], f"{where}[{i}]")
                if message:
                    return message
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                return f"{where} is missing the required property \"{name}\""
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in props:
                message = validate_arguments(item, props[name], f"{where}.{name}")
            elif extra is False:
                known = ", ".join(f'"{p}"' for p in props) or "none"
                message = f"{where} has the unknown property {_describe(name)} (allowed: {known})"
            elif isinstance(extra, dict):
                message = validate_arguments(item, extra, f"{where}.{name}")
            else:
                message = None
            if message:
                return message
    return None


# ---------------------------------------------------------------------------------------------
# Tools and the registry

def _to_result(value: Any, tool_name: str) -> ToolResult:
    """Convert what a tool function returned into a ToolResult (never raises)."""
    if isinstance(value, ToolResult):
        return value
    if isinstance(value, str):
        return ToolResult(text=value)
    if isinstance(value, Image.Image):
        return ToolResult(text="", images=[value])
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        images = value[1]
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)) and all(isinstance(im, Image.Image) for im in images):
            return ToolResult(text=value[0], images=list(images))
    return ToolResult.failure("tool_exception", f"the tool '{tool_name}' returned an unsupported value "
                              f"of type {type(value).__name__} (a bug in the tool, not in the call)")


@dataclass(frozen=True)
class Tool:
    """A tool: a function, the JSON schema of its arguments, and a description for the model.

    name: matches [A-Za-z0-9_-]{1,64} (the OpenAI function-name rule).
    fn: called as fn(context, **arguments) with validated arguments; returns a str, a PIL image,
        (str, [images]) or a ToolResult. An exception it raises becomes a "tool_exception" result.
    schema: JSON schema of the arguments object (type "object"); see `check_schema` for the subset.
    description: shown to the model in the system prompt (default "").
    """
    name: str
    fn: Callable[..., Any]
    schema: dict
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"name must match [A-Za-z0-9_-]{{1,64}}, got {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"fn must be callable, got {type(self.fn).__name__}")
        if not isinstance(self.description, str):
            raise TypeError(f"description must be a str, got {type(self.description).__name__}")
        check_schema(self.schema, "schema")
        if self.schema.get("type") != "object":
            raise ValueError(f"schema must describe the arguments object: type 'object', "
                             f"got {self.schema.get('type')!r}")

    def spec(self) -> dict:
        """The OpenAI/Qwen function spec, as rendered into the system prompt."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.schema}}

    def invoke(self, arguments: dict, context: ToolContext | None = None,
               call: ToolCall | None = None) -> ToolResult:
        """Validate `arguments` against the schema, call the function, convert its result."""
        call = call if call is not None else ToolCall(self.name, arguments)
        message = validate_arguments(arguments, self.schema)
        if message is not None:
            return ToolResult.failure("bad_arguments", message + f" (see the '{self.name}' tool's parameters)", call)
        try:
            value = self.fn(context if context is not None else ToolContext(), **arguments)
        except Exception as e:  # the tool's failure is reported to the model; the host keeps going
            detail = str(e)
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            return ToolResult.failure("tool_exception", f"{type(e).__name__}: {detail}" if detail
                                      else type(e).__name__, call)
        result = _to_result(value, self.name)
        return dataclasses.replace(result, call=call)


class ToolRegistry:
    """The tools an agent may call, by name.

    max_result_chars: a result text longer than this is cut, with a marker saying how much was
        cut (default 4000).
    """

    def __init__(self, tools: list[Tool] | tuple[Tool, ...] = (), *, max_result_chars: int = 4000):
        if isinstance(max_result_chars, bool) or not isinstance(max_result_chars, int) or max_result_chars < 100:
            raise ValueError(f"max_result_chars must be an int >= 100, got {max_result_chars!r}")
        self.max_result_chars = max_result_chars
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> Tool:
        """Add a Tool; a second tool with the same name is a ValueError."""
        if not isinstance(tool, Tool):
            raise TypeError(f"tool must be a Tool, got {type(tool).__name__}")
        if tool.name in self._tools:
            raise ValueError(f"name {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    def register(self, name: str, fn: Callable[..., Any] | None = None, schema: dict | None = None,
                 description: str = ""):
        """Register fn(context, **arguments) under `name` with the arguments' JSON `schema`.

        Without fn, returns a decorator: `@registry.register("name", schema=...)`.
        Returns the Tool (or, as a decorator, the function unchanged).
        """
        if schema is None:
            raise TypeError("schema is required (the JSON schema of the arguments object)")
        if fn is None:
            def decorator(f):
                self.add(Tool(name, f, schema, description))
                return f
            return decorator
        return self.add(Tool(name, fn, schema, description))

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> list[dict]:
        return [tool.spec() for tool in self._tools.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def execute(self, call_text: str | ToolCall, context: ToolContext | None = None) -> ToolResult:
        """Parse, look up, validate, run, convert and truncate: one call's full handling.

        call_text: the body of a `<tool_call>` block (or an already parsed ToolCall).
        context: the conversation's images (default: none).
        Never raises on model input; the returned result's `error` tells what went wrong.
        """
        call = call_text if isinstance(call_text, ToolCall) else parse_tool_call(call_text)
        if isinstance(call, ToolResult):
            return call
        tool = self._tools.get(call.name)
        if tool is None:
            available = ", ".join(self._tools) or "none"
            return ToolResult.failure("unknown_tool", f"there is no tool named {_describe(call.name)} "
                                      f"(available: {available})", call)
        return self._truncate(tool.invoke(call.arguments, context, call))

    def _truncate(self, result: ToolResult) -> ToolResult:
        text = result.text if isinstance(result.text, str) else str(result.text)
        if len(text) <= self.max_result_chars:
            return result if text is result.text else dataclasses.replace(result, text=text)
        # reserve room for the marker at its longest, so that text + marker fits the limit
        keep = self.max_result_chars - len(_TRUNCATION_MARKER.format(n=len(text)))
        marker = _TRUNCATION_MARKER.format(n=len(text) - keep)
        return dataclasses.replace(result, text=text[:keep] + marker)
