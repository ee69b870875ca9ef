"""Llama 3.1 tool calling: tool definitions -> the prompt that offers them, the model's answer
-> a tool call, and a past tool call -> its text in a dialog.

The format is Meta's (llama-models 0.3.0, ToolPromptFormat.json, and its Llama 3.1 prompt
format document): with tools, the system message starts with "Environment: ipython" and the
knowledge and today's dates, and a user message before the dialog's own lists the tools in
JSON; the model answers a call as `<|python_tag|>{"type": "function", "name": ...,
"parameters": {...}}` ended by `<|eom_id|>`. A call in a dialog's history is written as that
JSON; a tool's result is a message of role "tool" (the "ipython" header). The answer is read
as llama-models reads it: the JSON call (with or without "type"), or `<function=NAME>{...}`.

Tools are given in OpenAI's shape, `{"type": "function", "function": {"name", "description",
"parameters": <JSON schema of an object>}}`, and calls come out in llama-models' shape,
`{"call_id", "tool_name", "arguments"}`. tool_choice: "auto" (the model decides), "none"
(the tools are not offered), "required" (the answer is made to start as a call), or
`{"type": "function", "function": {"name": NAME}}` (a call of NAME).
"""

import datetime
import json
import re
import uuid
from typing import Any, Dict, List, Optional, Sequence, Union

from .errors import LlamaError

PYTHON_TAG = "<|python_tag|>"
KNOWLEDGE_DATE = "December 2023"  # Llama 3.1's, as its system prompt states it
TOOL_CHOICES = ("auto", "none", "required")
# <function=NAME>{...}: the other form llama-models reads a custom tool call in.
FUNCTION_TAG = re.compile(r"<function=(?P<name>[^}>]+)>(?P<args>{.*})", re.DOTALL)

ToolChoice = Union[str, Dict[str, Any]]


def check_tools(tools: Any, where: str = "tools") -> List[Dict[str, Any]]:
    """`tools` as a list of OpenAI function definitions, or a LlamaError naming the bad one."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise LlamaError(f"{where} must be a non-empty list of {{'type': 'function', 'function': {{'name', "
                         f"'description', 'parameters'}}}} objects")
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise LlamaError(f"{where}[{i}] must be {{'type': 'function', 'function': {{...}}}}, got {tool!r:.80}")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise LlamaError(f"{where}[{i}].function.name={name!r:.80} must be 1 to 64 letters, digits, '_', '.' "
                             f"or '-'")
        if name in names:
            raise LlamaError(f"{where}[{i}]: the name {name!r} is given twice")
        names.add(name)
        description = function.get("description", "")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(description, str):
            raise LlamaError(f"{where}[{i}].function.description must be text")
        if not isinstance(parameters, dict) or not isinstance(parameters.get("properties", {}), dict) \
                or not isinstance(parameters.get("required", []), list):
            raise LlamaError(f"{where}[{i}].function.parameters must be a JSON schema of an object "
                             f"({{'type': 'object', 'properties': {{...}}, 'required': [...]}})")
    return list(tools)


def check_tool_choice(choice: Any, tools: Optional[Sequence[Dict[str, Any]]],
                      where: str = "tool_choice") -> ToolChoice:
    """`choice` checked against the tools offered (a named function must be one of them)."""
    if choice in TOOL_CHOICES:
        if choice != "none" and not tools:
            raise LlamaError(f"{where}={choice!r} needs tools")
        return choice
    function = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(function, dict) or choice.get("type") != "function":
        raise LlamaError(f"{where}={choice!r:.80} must be 'auto', 'none', 'required' or "
                         f"{{'type': 'function', 'function': {{'name': NAME}}}}")
    names = [t["function"]["name"] for t in tools or []]
    if function.get("name") not in names:
        raise LlamaError(f"{where} names the function {function.get('name')!r:.80}, which is not among the tools "
                         f"({', '.join(names) or 'none given'})")
    return choice


def _function_json(function: Dict[str, Any]) -> str:
    """One tool as Meta's JSON tool template writes it: 4-space indents, each parameter as
    {name: {"type": "object", "description": ...}} in a list, the required names on one line."""
    schema = function.get("parameters") or {}
    properties = schema.get("properties") or {}
    placeholder = "\x00required\x00"
    shown = {"type": "function", "function": {
        "name": function["name"], "description": function.get("description", ""),
        "parameters": {"type": "object",
                       "properties": [{name: {"type": "object", "description": spec.get("description", "")
                                              if isinstance(spec, dict) else ""}}
                                      for name, spec in properties.items()],
                       "required": placeholder}}}
    text = json.dumps(shown, indent=4, ensure_ascii=False)
    return text.replace(json.dumps(placeholder), json.dumps(list(schema.get("required") or [])))


def tools_message(tools: Sequence[Dict[str, Any]]) -> str:
    """The user message that offers the tools (Meta's JSON custom-tool template)."""
    listed = "\n".join(_function_json(t["function"]) for t in tools)
    return ("Answer the user's question by making use of the following functions if needed.\n"
            "If none of the function can be used, please say so.\n"
            f"Here is a list of functions in JSON format:\n{listed}\n\nReturn function calls in JSON format.")


def system_message(system: Optional[str], today: Optional[datetime.date] = None) -> str:
    """The system message of a dialog with tools: the ipython environment, the dates, then the
    dialog's own system message, if any."""
    today = today or datetime.date.today()
    text = (f"Environment: ipython\n\nCutting Knowledge Date: {KNOWLEDGE_DATE}\n"
            f"Today Date: {today.strftime('%d %B %Y')}\n")
    return text if system is None else f"{text}\n{system}\n"


def call_prefix(choice: ToolChoice) -> str:
    """The text the answer is made to start with: nothing for "auto" and "none"; the start of a
    call for "required"; the start of a call of the named function for a named choice."""
    if choice in ("auto", "none"):
        return ""
    start = PYTHON_TAG + '{"type": "function", "name": "'
    return start if choice == "required" else start + choice["function"]["name"] + '", "parameters": '


def call_text(call: Dict[str, Any]) -> str:
    """A past call as the model writes it (llama-models' encoding for the JSON format)."""
    return json.dumps({"type": "function", "name": call["tool_name"], "parameters": call["arguments"]})


def parse_tool_call(text: str) -> Optional[Dict[str, Any]]:
    """The tool call an answer makes, as {"call_id", "tool_name", "arguments"}, or None when it
    makes none (plain text, or JSON that is not a call)."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    tagged = FUNCTION_TAG.search(body)
    if tagged is not None:
        name, arguments = tagged.group("name"), _json_object(tagged.group("args"))
    else:
        call = _json_object(body)
        if call is None or not isinstance(call.get("name"), str) or call.get("type", "function") != "function":
            return None
        name, arguments = call["name"], call.get("parameters", call.get("arguments", {}))
    if arguments is None or not isinstance(arguments, dict):
        return None
    return {"call_id": str(uuid.uuid4()), "tool_name": name, "arguments": arguments}


def _json_object(text: str) -> Optional[Dict[str, Any]]:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def might_be_call(text: str) -> bool:
    """Whether an answer that starts with `text` may still turn out to be a tool call (so a
    stream must hold it back): empty so far, or starting as a call does."""
    start = text.lstrip()
    return not start or any(p.startswith(start[:len(p)]) for p in (PYTHON_TAG, "{", "<function="))
