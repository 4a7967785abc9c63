"""Function calling in FunctionGemma's format (Google's Gemma function-calling documentation).

A conversation with tools renders as

    <start_of_turn>developer\\n{system}<start_function_declaration>declaration:NAME{...}<end_function_declaration><end_of_turn>\\n
    <start_of_turn>user\\n{question}<end_of_turn>\\n
    <start_of_turn>model\\n<start_function_call>call:NAME{arg:<escape>text<escape>}<end_function_call>
    <start_function_response>response:NAME{key:value}<end_function_response>{reply}<end_of_turn>\\n

(the model turn is one line in the real text). Every string value is wrapped in `<escape>`;
keys are bare and sorted; types are upper-case; numbers, `true`/`false` and `null` are bare.
Where the tokenizer has these control tokens (FunctionGemma's does) each is one token; where it
does not (Gemma 3's own), the same strings are tokenized as text: one format either way, so a
model trained here reads prompts rendered by the chat template we ship with every export.

The model learns its calls and the `<start_function_response>` that ends them (the stop sequence
FunctionGemma's docs name), never the tool's results.
"""

from __future__ import annotations

import json

START_DECL, END_DECL = "<start_function_declaration>", "<end_function_declaration>"
START_CALL, END_CALL = "<start_function_call>", "<end_function_call>"
START_RESP, END_RESP = "<start_function_response>", "<end_function_response>"
ESCAPE = "<escape>"
CONTROL_TOKENS = (START_DECL, END_DECL, START_CALL, END_CALL, START_RESP, END_RESP, ESCAPE)


class ToolFormatError(ValueError):
    """A tool schema, call or result that cannot be rendered; the message says what to fix."""


def _s(text: str) -> str:
    return f"{ESCAPE}{text}{ESCAPE}"


def value(v: object) -> str:
    """One argument or result value: strings escaped, mappings with bare sorted keys."""
    if isinstance(v, str):
        return _s(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{value(v[k])}" for k in sorted(v)) + "}"
    if isinstance(v, list | tuple):
        return "[" + ",".join(value(x) for x in v) + "]"
    if isinstance(v, int | float):
        return json.dumps(v)
    raise ToolFormatError(f"cannot render a {type(v).__name__} value; use JSON types")


def _schema_fields(schema: dict) -> list[str]:
    """The fields of one property schema, in FunctionGemma's order, type last."""
    kind = str(schema.get("type", "")).upper()
    out = []
    if schema.get("description"):
        out.append(f"description:{_s(schema['description'])}")
    if kind == "STRING" and schema.get("enum"):
        out.append(f"enum:{value(schema['enum'])}")
    if kind == "ARRAY" and isinstance(schema.get("items"), dict) and schema["items"]:
        out.append("items:{" + ",".join(_schema_fields(schema["items"])) + "}")
    if schema.get("nullable"):
        out.append("nullable:true")
    if kind == "OBJECT" and isinstance(schema.get("properties"), dict):
        out.append("properties:{" + _properties(schema["properties"]) + "}")
        if schema.get("required"):
            out.append("required:" + value(list(schema["required"])))
    if kind:
        out.append(f"type:{_s(kind)}")
    return out


def _properties(props: dict) -> str:
    return ",".join(
        f"{k}:{{{','.join(_schema_fields(props[k] if isinstance(props[k], dict) else {}))}}}"
        for k in sorted(props)
    )


def function_schema(tool: object) -> dict:
    """The function of an OpenAI-style tool (`{"type": "function", "function": {...}}`, or the
    bare `{"name", "description", "parameters"}`), checked."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ToolFormatError(
            'each tool must be {"type": "function", "function": {"name": ..., "parameters": ...}}'
        )
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ToolFormatError(f"tool {fn['name']}: 'parameters' must be a JSON schema object")
    return fn


def declaration(tool: object) -> str:
    """`<start_function_declaration>declaration:NAME{description:...,parameters:{...}}<end_...>`"""
    fn = function_schema(tool)
    fields = [f"description:{_s(fn.get('description') or '')}"]
    params = fn.get("parameters")
    if params:
        p = []
        if isinstance(params.get("properties"), dict) and params["properties"]:
            p.append("properties:{" + _properties(params["properties"]) + "}")
        if params.get("required"):
            p.append("required:" + value(list(params["required"])))
        if params.get("type"):
            p.append(f"type:{_s(str(params['type']).upper())}")
        fields.append("parameters:{" + ",".join(p) + "}")
    return f"{START_DECL}declaration:{fn['name']}{{{','.join(fields)}}}{END_DECL}"


def call_text(name: str, arguments: dict) -> str:
    """`<start_function_call>call:NAME{key:value,...}<end_function_call>`"""
    body = ",".join(f"{k}:{value(arguments[k])}" for k in sorted(arguments))
    return f"{START_CALL}call:{name}{{{body}}}{END_CALL}"


def response_body(name: str, result: object) -> str:
    """`response:NAME{...}<end_function_response>` (`<start_function_response>` is the model's):
    a JSON object renders its keys, anything else (a string too) as `{value:...}`. A string is
    never parsed: the chat template cannot parse one either, and serving must render alike."""
    if isinstance(result, dict):
        body = ",".join(f"{k}:{value(result[k])}" for k in sorted(result))
    else:
        body = f"value:{value(result)}"
    return f"response:{name}{{{body}}}{END_RESP}"


def parse_arguments(raw: object) -> dict:
    """Call arguments as a mapping: OpenAI sends a JSON string, others an object."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolFormatError(f"arguments are not valid JSON ({e.msg})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ToolFormatError("arguments must be a JSON object")
    return raw
