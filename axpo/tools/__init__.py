"""Tools for multimodal tool-using agents: leaves (a function, a JSON schema, limits), no
dependency on the rest of axpo.

The model writes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; the agent loop hands
the text between the tags to `ToolRegistry.execute`, which parses it, validates the arguments
against the tool's JSON schema, runs the tool and returns a `ToolResult` (text for the model, maybe
images). Model output is untrusted: `execute` never raises on it; every failure is a result whose
`error` is one of ERROR_KINDS and whose text, "Error (<kind>): <message>", tells the model what to fix:

    malformed_call     the call is not JSON, not an object, has no non-empty string "name", its
                       "arguments" is not an object (or a JSON string of one), or it is too long
    unknown_tool       no tool has that name
    bad_arguments      the arguments fail the tool's schema (missing required property, wrong type
                       -- booleans are not integers --, extra property, enum, minimum/maximum,
                       array length, string length), or the tool refused them (e.g. an empty box
                       or an image index out of range for zoom)
    tool_exception     the tool function raised, or the code run by the python tool raised
                       (the result shows the last lines of its traceback)
    timeout            a wall-clock or CPU-time limit was exceeded (python)
    memory_limit       the memory limit was exceeded (python)
    sandbox_violation  the code tried something the sandbox refuses: files outside its directory,
                       network, processes, signals, native code (python)
    crashed            the process died for another reason (a signal), or the sandbox could not
                       start (python)

Truncation of long output is not an error: it is marked in the text.

Built-in tools (`TOOLS`, name -> builder taking the tool's options): `zoom` (crop and enlarge a
region of an image: axpo.tools.zoom) and `python` (sandboxed code execution:
axpo.tools.python_sandbox, whose docstring details the sandbox). `build_registry(names, ...)` makes
a run's registry from its config; its `specs()` are what the prompt announces.
"""
from .python_sandbox import PythonSandbox, python_tool
from .registry import (ERROR_KINDS, Tool, ToolCall, ToolContext, ToolRegistry, ToolResult,
                       parse_tool_call)
from .zoom import ZoomTool, zoom_tool

__all__ = ["ERROR_KINDS", "TOOLS", "Tool", "ToolCall", "ToolContext", "ToolResult", "ToolRegistry",
           "parse_tool_call", "build_registry", "default_registry", "zoom_tool", "python_tool", "ZoomTool",
           "PythonSandbox"]

# the built-in tools by name: each builder takes that tool's options as keyword arguments
TOOLS = {"zoom": zoom_tool, "python": python_tool}

_ZOOM_OPTIONS = ("scale", "min_side", "max_side", "max_pixels", "coordinates")
_REGISTRY_OPTIONS = ("max_result_chars",)


def build_registry(names, *, max_result_chars: int = 4000, options: dict | None = None) -> ToolRegistry:
    """A registry of the built-in tools `names` (in that order; see TOOLS), each built with
    options[name] (a dict of its builder's keyword arguments). A ValueError names a bad entry."""
    options = dict(options or {})
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"tool names must be a list of strings, got {names!r}")
    for name in list(names) + list(options):
        if name not in TOOLS:
            raise ValueError(f"unknown tool {name!r}: the built-in tools are {sorted(TOOLS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be distinct, got {list(names)}")
    registry = ToolRegistry(max_result_chars=max_result_chars)
    for name in names:
        opts = options.get(name) or {}
        if not isinstance(opts, dict):
            raise ValueError(f"options of tool {name!r} must be a mapping, got {opts!r}")
        try:
            registry.add(TOOLS[name](**opts))
        except (TypeError, ValueError) as e:  # an unknown option, or a value out of range
            raise ValueError(f"tool {name!r}: {e}") from None
    return registry


def default_registry(*, python: bool = True, zoom: bool = True, **limits) -> ToolRegistry:
    """A registry with the built-in tools.

    python, zoom: include that tool (default both).
    limits: max_result_chars goes to the registry; scale, min_side, max_side, max_pixels to
        ZoomTool; everything else to PythonSandbox (timeout_s, cpu_s, memory_mb, ...).
    """
    registry = ToolRegistry(**{k: limits.pop(k) for k in _REGISTRY_OPTIONS if k in limits})
    zoom_options = {k: limits.pop(k) for k in _ZOOM_OPTIONS if k in limits}
    if zoom:
        registry.add(zoom_tool(**zoom_options))
    if python:
        registry.add(python_tool(**limits))
    elif limits:
        raise TypeError(f"unexpected options {sorted(limits)} (python=False, so no sandbox takes them)")
    return registry
