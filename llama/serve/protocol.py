"""OpenAI's HTTP API as data: a request body -> a checked job for the engine, and the job's
tokens -> the response objects and stream chunks of /v1/chat/completions and /v1/completions,
logprobs included. No HTTP and no engine here (llama.serve.app is the HTTP layer).

Every request field is in FIELDS, implemented or refused with a 400 that names it; a field
not in FIELDS is refused too (docs/serving.md's table is made from FIELDS). Errors are
APIError, which the app turns into OpenAI's shape {"error": {"message", "type", "param",
"code"}}; argument checks use the engine's validation vocabulary (llama.utils.checks), so a
bad value gets the words it gets everywhere else.
"""

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..chat_format import ChatFormat
from ..detokenize import token_text, token_texts
from ..errors import LlamaError
from ..runtime.engine import MAX_TOP_LOGPROBS, Request, check_prompt
from ..runtime.sampling import SamplingControls, check_sampling, request_key
from ..tokenizer import Tokenizer
from ..tool_calls import check_tool_choice, check_tools, call_prefix
from ..utils.checks import flag, whole_number

DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB of JSON: far more than any max_seq_len of text
COMPLETION_LOGPROBS_MAX = 5  # /v1/completions' `logprobs` (an int), as OpenAI's legacy API
MAX_CHOICES = 16  # n (times the prompts of one /v1/completions request)
MAX_JSON_DEPTH = 32  # far deeper than any request; deeper nesting is refused, not parsed

# ---- every request field, and what this server does with it ----------------------------------

IMPLEMENTED, PARTLY, REFUSED = "implemented", "partly", "refused"
_SAMPLING = {
    "model": (IMPLEMENTED, "the served model's id (`GET /v1/models`); another gets 404; may be left out"),
    "temperature": (IMPLEMENTED, "OpenAI's default 1; 0 is greedy"),
    "top_p": (IMPLEMENTED, "OpenAI's default 1"),
    "max_tokens": (IMPLEMENTED, "default: the room left in `--max_seq_len`"),
    "stop": (IMPLEMENTED, "a string or up to 4: the text ends before the first one"),
    "seed": (IMPLEMENTED, "samples exactly as the library's `seed` does, whatever else runs"),
    "n": (IMPLEMENTED, f"1 to {MAX_CHOICES} choices, each with its own sampling key; the prompt is prefilled once"),
    "stream": (IMPLEMENTED, "server-sent events ending with `data: [DONE]`"),
    "stream_options": (PARTLY, "`include_usage` only"),
    "logit_bias": (IMPLEMENTED, "token id -> bias in [-100, 100], added to the logits"),
    "presence_penalty": (IMPLEMENTED, "in [-2, 2], over the tokens generated so far"),
    "frequency_penalty": (IMPLEMENTED, "in [-2, 2], over the tokens generated so far"),
    "top_k": (IMPLEMENTED, "vLLM's extra: the k most likely tokens (0 or -1: all)"),
    "min_p": (IMPLEMENTED, "vLLM's extra: tokens at least min_p times the most likely one's probability"),
    "repetition_penalty": (IMPLEMENTED, "vLLM's extra: > 0, 1 is none; over prompt and answer"),
    "user": (IMPLEMENTED, "accepted and written in no answer: OpenAI's end-user id, for its abuse monitoring"),
}
FIELDS: Dict[str, Dict[str, Tuple[str, str]]] = {
    "/v1/chat/completions": {
        "messages": (PARTLY, "text content (text parts are joined; role `developer` is `system`), assistant "
                             "`tool_calls` and `tool` results; no images or audio"),
        **_SAMPLING,
        "max_completion_tokens": (IMPLEMENTED, "as `max_tokens`"),
        "logprobs": (IMPLEMENTED, "each answer token's logprob (of the raw model logits)"),
        "top_logprobs": (IMPLEMENTED, f"0 to {MAX_TOP_LOGPROBS} alternatives per token, with logprobs=true"),
        "response_format": (PARTLY, "`{\"type\": \"text\"}` only: JSON modes and schemas are not implemented"),
        "modalities": (PARTLY, "`[\"text\"]` only"),
        "store": (PARTLY, "false only: answers are not stored"),
        "tools": (IMPLEMENTED, "functions, offered in Llama 3.1's JSON tool format (Llama 3 chat-format models "
                               "only); a call comes back as `tool_calls`, finish_reason `tool_calls`"),
        "tool_choice": (IMPLEMENTED, "`auto` (default with tools), `none`, `required`, or a named function: the "
                                     "answer is made to start as that call"),
        "parallel_tool_calls": (PARTLY, "accepted; Llama 3.1's format makes at most one call per answer"),
        "functions": (REFUSED, "deprecated by OpenAI: send `tools`"),
        "function_call": (REFUSED, "deprecated by OpenAI: send `tool_choice`"),
        "audio": (REFUSED, "the model reads and writes text only"),
        "prediction": (REFUSED, "predicted outputs are not implemented"),
        "reasoning_effort": (REFUSED, "not a reasoning model"),
        "web_search_options": (REFUSED, "no web search"),
        "metadata": (REFUSED, "answers are not stored"),
        "service_tier": (REFUSED, "one tier"),
    },
    "/v1/completions": {
        "prompt": (IMPLEMENTED, "a string, token ids, or a list of either (one choice each, in order)"),
        **_SAMPLING,
        "echo": (IMPLEMENTED, "the prompt leads the text (and its tokens the logprobs); with max_tokens 0, "
                              "the prompt scored only"),
        "logprobs": (IMPLEMENTED, f"0 to {COMPLETION_LOGPROBS_MAX} alternatives per token, prompt tokens "
                                  f"included with echo"),
        "best_of": (IMPLEMENTED, "n to 16 samples of each prompt, the n with the highest mean token logprob "
                                 "returned, best first (all counted in usage); not with stream"),
        "suffix": (REFUSED, "insertion is not implemented for this endpoint (the library's text_infilling "
                            "does it for Code Llama)"),
    },
}


def fields_table() -> str:
    """FIELDS as the markdown table of docs/serving.md (a test keeps the two equal)."""
    rows = ["| field | chat | completions | what this server does |", "|---|---|---|---|"]
    chat, completions = FIELDS["/v1/chat/completions"], FIELDS["/v1/completions"]
    for name in dict.fromkeys([*chat, *completions]):
        statuses = [table[name][0] if name in table else "-" for table in (chat, completions)]
        doc = (chat.get(name) or completions[name])[1]
        if name in chat and name in completions and chat[name][1] != completions[name][1]:
            doc = f"chat: {chat[name][1]}; completions: {completions[name][1]}"
        rows.append(f"| `{name}` | {statuses[0]} | {statuses[1]} | {doc} |")
    return "\n".join(rows) + "\n"


class APIError(Exception):
    """An error answer in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def json_depth(value: Any) -> int:
    """How deeply parsed JSON nests (a scalar: 0, `[]`: 1), level by level, without recursion."""
    depth, level = 0, [value]
    while True:
        containers = [item for item in level if isinstance(item, (dict, list))]
        if not containers:
            return depth
        depth += 1
        level = [v for c in containers for v in (c.values() if isinstance(c, dict) else c)]


def too_deep() -> APIError:
    return APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels, which no field of this "
                         f"API needs; send a flatter body")


# ---- reading a request's arguments ----------------------------------------------------------

def _checked(check, *args, param: str, **kwargs):
    """check(*args, **kwargs), a LlamaError becoming a 400 naming `param`."""
    try:
        return check(*args, **kwargs)
    except LlamaError as exc:
        raise APIError(400, str(exc), param=param) from None


def _flag(body: Dict[str, Any], name: str) -> bool:
    return bool(_checked(flag, body.get(name), name, optional=True, param=name))


def _whole(body: Dict[str, Any], name: str, low: int, high: Optional[int] = None) -> Optional[int]:
    """An integer argument in [low, high], or None when absent."""
    return _checked(whole_number, body.get(name), name, low, high, optional=True, param=name)


def split_stops(value: object) -> Tuple[str, ...]:
    """OpenAI's `stop`: a string or a list of up to 4 strings -> a tuple (APIError otherwise)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise APIError(400, f"stop={value!r:.80} must be a string or a list of at most 4 strings", param="stop")


@dataclass
class Choice:
    """One choice of an answer: its engine request, and (for /v1/completions) the prompt its
    text continues and, with echo, starts with."""
    index: int
    request: Request
    context: Sequence[int] = ()
    prompt_text: str = ""


@dataclass
class CompletionJob:
    """A checked request: the engine requests of its choices and how the answer is written."""
    choices: List[Choice]
    shape: "ResponseShape"
    stops: Tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool
    prompt_tokens: int  # for usage: each prompt once, whatever n
    echo: bool = False
    tools: Tuple[str, ...] = ()  # the functions the answer may call (chat with tools offered)
    tool_prefix: str = ""  # the start of a call the prompt already holds (tool_choice required or named)
    keep: int = 0  # best_of: of each prompt's `candidates` choices, answer only the `keep` best (0: all)
    candidates: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


def _calls_of(calls: Any, index: int) -> List[Dict[str, Any]]:
    """An assistant message's OpenAI `tool_calls` as the dialog's calls (llama-models' shape)."""
    out = []
    for call in calls if isinstance(calls, list) else [None]:
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict) or not isinstance(function.get("name"), str):
            raise APIError(400, f"messages[{index}].tool_calls must be a list of {{'id', 'type': 'function', "
                                f"'function': {{'name', 'arguments': '<a JSON object as text>'}}}}, got "
                                f"{calls!r:.80}", param="messages")
        out.append({"call_id": str(call.get("id", "")), "tool_name": function["name"], "arguments": parsed})
    return out


class RequestReader:
    """Request bodies -> CompletionJobs for one model: its tokenizer, chat format and limits."""

    def __init__(self, tokenizer: Tokenizer, formatter: ChatFormat, max_seq_len: int, vocab_size: int,
                 model_name: str):
        self.tokenizer, self.formatter, self.model_name = tokenizer, formatter, model_name
        self.max_seq_len, self.vocab_size = max_seq_len, vocab_size

    def check_body(self, body: Any, endpoint: str) -> Dict[str, Any]:
        """The parsed body, checked for what every endpoint takes: known fields only, the model."""
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        fields = FIELDS[endpoint]
        for name in body:
            if name not in fields:
                raise APIError(400, f"{name!r:.60} is not a field of {endpoint} that this server knows; remove it "
                                    f"(docs/serving.md lists every field)", param=str(name)[:60],
                               code="unsupported_field")
            status, why = fields[name]
            if status == REFUSED and body[name] is not None:
                raise APIError(400, f"{name} is not supported by this server: {why}; remove it", param=name,
                               code="unsupported_field")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"model={model!r:.80} is not served here; this server serves "
                                f"{self.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
        self._check_values(body)
        return body

    @staticmethod
    def _check_values(body: Dict[str, Any]) -> None:
        """The fields implemented for some values only."""
        allowed = {"response_format": ({"type": "text"},), "modalities": (["text"],), "store": (False,)}
        for name, values in allowed.items():
            if body.get(name) is not None and body[name] not in values:
                why = FIELDS["/v1/chat/completions"][name][1]
                raise APIError(400, f"{name}={body[name]!r:.80} is not supported: {why}",
                               param=name, code="unsupported_value")
        options = body.get("stream_options")
        if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
            raise APIError(400, f"stream_options={options!r:.80}: only {{'include_usage': true|false}} is supported",
                           param="stream_options", code="unsupported_value")

    def chat_job(self, body: Dict[str, Any]) -> CompletionJob:
        logprobs = _flag(body, "logprobs")
        top = _whole(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
        if top and not logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        tools = _checked(check_tools, body["tools"], param="tools") if body.get("tools") is not None else None
        choice = body.get("tool_choice")
        choice = ("auto" if tools else "none") if choice is None else choice
        choice = _checked(check_tool_choice, choice, tools, param="tool_choice")
        if body.get("parallel_tool_calls") is not None:
            _flag(body, "parallel_tool_calls")
        prompt = self._dialog_tokens(body, tools, choice)
        job = self._job(body, [prompt], self.formatter.stop_tokens, CHAT, logprobs, top)
        if tools and choice != "none":
            job.tools = tuple(t["function"]["name"] for t in tools)
            job.tool_prefix = call_prefix(choice)
        return job

    def completion_job(self, body: Dict[str, Any]) -> CompletionJob:
        top = _whole(body, "logprobs", 0, COMPLETION_LOGPROBS_MAX)
        echo = _flag(body, "echo")
        n = _whole(body, "n", 1, MAX_CHOICES) or 1
        best_of = _whole(body, "best_of", 1, MAX_CHOICES)
        if best_of is not None and best_of < n:
            raise APIError(400, f"best_of={best_of} must be at least n={n}", param="best_of")
        if best_of is not None and best_of > n and _flag(body, "stream"):
            raise APIError(400, f"best_of={best_of} above n={n} cannot be streamed (the best are known at the end), "
                                f"as in OpenAI's API", param="best_of")
        return self._job(body, self._prompts(body), self.tokenizer.stop_tokens, COMPLETION, top is not None,
                         top or 0, echo, candidates=best_of)

    def _dialog_tokens(self, body: Dict[str, Any], tools, choice) -> List[int]:
        """The chat prompt of `messages`, in the model's chat format, offering `tools`."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list of {'role', 'content'} objects", param="messages")
        dialog = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
            # Fields other servers answer with, which clients send back: only empty ones are taken.
            extra = {k for k, v in message.items() if v not in (None, []) and k not in (
                "role", "content", "name", "tool_calls", "tool_call_id")}
            if extra:
                raise APIError(400, f"messages[{i}] has {sorted(extra)}: this server takes 'role', 'content', "
                                    f"'name', 'tool_calls' and 'tool_call_id'", param="messages",
                               code="unsupported_field")
            content = message.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise APIError(400, f"messages[{i}].content: this model reads text parts only "
                                        f"({{'type': 'text', 'text': ...}})", param="messages")
                content = "".join(str(p.get("text", "")) for p in content)
            role = "system" if message.get("role") == "developer" else message.get("role")
            dialog.append({"role": role, "content": content})
            if message.get("tool_calls") is not None:
                dialog[-1]["tool_calls"] = _calls_of(message["tool_calls"], i)
        _checked(self.formatter.check_dialog, dialog, param="messages")
        if self.formatter.is_unsafe(dialog):
            raise APIError(400, self.formatter.UNSAFE_ERROR, param="messages")
        return _checked(self.formatter.encode_dialog_prompt, dialog, tools, choice,
                        param="tools" if tools else "messages")

    def _prompts(self, body: Dict[str, Any]) -> List[List[int]]:
        """`prompt`: a string, token ids, or a list of strings or of token-id lists."""
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or len(prompt) > MAX_CHOICES or not all(
                isinstance(p, str) or (isinstance(p, list) and p) for p in prompt):
            raise APIError(400, f"prompt={prompt!r:.80} must be a string, a list of token ids, or a list of up to "
                                f"{MAX_CHOICES} of either", param="prompt")
        return [self.tokenizer.encode(p, bos=self.tokenizer.add_bos, eos=False) if isinstance(p, str) else p
                for p in prompt]

    def _job(self, body: Dict[str, Any], prompts: List[List[int]], stop_tokens, shape: "ResponseShape",
             logprobs: bool, top: int, echo: bool = False, candidates: Optional[int] = None) -> CompletionJob:
        """The engine requests for `prompts` (n choices each, or `candidates` of which the best n
        are kept: best_of) with the body's sampling arguments, checked."""
        temperature = 1.0 if body.get("temperature") is None else body["temperature"]  # OpenAI's defaults
        top_p = 1.0 if body.get("top_p") is None else body["top_p"]
        try:
            temperature, top_p, _ = check_sampling(temperature, top_p, None)
        except LlamaError as exc:
            raise APIError(400, str(exc), param=str(exc).partition("=")[0]) from None
        n = _whole(body, "n", 1, MAX_CHOICES) or 1
        keep, n = (n, candidates) if candidates is not None and candidates > n else (0, n)
        if n * len(prompts) > MAX_CHOICES:
            name = "best_of" if keep else "n"
            raise APIError(400, f"{name}={n} choices for each of {len(prompts)} prompts is more than the "
                                f"{MAX_CHOICES} choices one request may ask for; send several requests", param=name)
        controls = self._controls(body)
        max_tokens = _whole(body, "max_completion_tokens", 1)
        if max_tokens is None:  # 0 with echo: the prompt scored only
            max_tokens = _whole(body, "max_tokens", 0 if echo else 1)
        seed = _whole(body, "seed", -2**63, 2**63 - 1)
        stops = split_stops(body.get("stop"))
        choices = []
        for number, prompt in enumerate(prompts):
            where = "the prompt" if len(prompts) == 1 else f"prompt {number}"
            try:
                check_prompt(prompt, self.max_seq_len, self.vocab_size, where)
            except LlamaError as exc:
                code = "context_length_exceeded" if len(prompt) > self.max_seq_len else None
                raise APIError(400, str(exc), param="messages" if "messages" in body else "prompt",
                               code=code) from None
            room = self.max_seq_len - len(prompt)
            if (room == 0 and max_tokens != 0) or (max_tokens is not None and max_tokens > room):
                raise APIError(400, f"{where} has {len(prompt)} tokens and max_tokens={max_tokens or 1} more are "
                                    f"asked for, over this server's context of max_seq_len={self.max_seq_len} "
                                    f"tokens; shorten the prompt or ask for fewer tokens", param="max_tokens",
                               code="context_length_exceeded")
            context = prompt if shape is COMPLETION else ()
            prompt_text = self.tokenizer.decode(prompt) if echo else ""
            for j in range(n):
                index = number * n + j
                # seed s samples choice i as chat_completion([dialog] * n, seed=s)[i] does.
                key = 0 if temperature == 0 else request_key(seed, index) if seed is not None \
                    else secrets.randbits(62)
                # best_of ranks by the tokens' logprobs: computed even where they are not shown
                request = Request(prompt, room if max_tokens is None else max_tokens, temperature, top_p, key,
                                  tuple(stop_tokens), logprobs or bool(keep), prompt_logprobs=echo and logprobs,
                                  top_logprobs=top, controls=controls)
                choices.append(Choice(index, request, context, prompt_text))
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return CompletionJob(choices, shape, stops, _flag(body, "stream"), include_usage, logprobs,
                             sum(len(p) for p in prompts), echo, keep=keep, candidates=n if keep else 0)

    def _controls(self, body: Dict[str, Any]) -> SamplingControls:
        """top_k, min_p, the penalties and logit_bias, checked as the library checks them."""
        names = ("top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias")
        given = {name: body[name] for name in names if body.get(name) is not None}
        if given.get("top_k") == -1:  # vLLM's "all tokens"
            given["top_k"] = 0
        try:
            return SamplingControls.checked(**given, vocab_size=self.vocab_size)
        except LlamaError as exc:
            raise APIError(400, str(exc), param=str(exc).partition("=")[0].split()[0]) from None


# ---- answers out -----------------------------------------------------------------------------

@dataclass
class TokenEntry:
    """One token of an answer as its logprob entry shows it: its text (the detokenizer's),
    logprob (None for a prompt's first token), most likely alternatives (text, logprob, raw)
    and `raw`: its bytes where its text is not whole characters (a byte of a character split
    over tokens shows as U+FFFD), else None (the text's UTF-8)."""
    text: str
    logprob: Optional[float]
    top: Optional[List[Tuple[str, float, Optional[bytes]]]] = None
    raw: Optional[bytes] = None


@dataclass
class Piece:
    """Part of a choice's answer: new text, the tokens it came from and, on the last piece, why
    the answer ended and the prompt's entries (echo with logprobs)."""
    text: str
    tokens: List[TokenEntry]
    finish_reason: Optional[str] = None
    prompt: Optional[List[TokenEntry]] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None  # the call the answer made (llama-models' shape)


def usage(job: CompletionJob, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens}


class ResponseShape:
    """How one endpoint writes an answer: whole (one object) or as stream chunks."""
    id_prefix: str
    whole_object: str
    chunk_object: str

    def opening(self, job: CompletionJob, choice: Choice) -> Optional[Dict[str, Any]]:
        """The first chunk's choice fields, before any token (None: no such chunk)."""
        raise NotImplementedError

    def delta(self, text: str, entries: List[TokenEntry], job: CompletionJob, offset: int) -> Dict[str, Any]:
        """A chunk's choice fields for new text; `offset`: characters of the choice sent before it."""
        raise NotImplementedError

    def closing(self) -> Dict[str, Any]:
        """The choice fields of the chunk that carries finish_reason."""
        raise NotImplementedError

    def whole(self, text: str, entries: List[TokenEntry], job: CompletionJob, choice: Choice,
              tool_calls: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        """The choice fields of a whole answer (entries: the prompt's first, with echo)."""
        raise NotImplementedError


class ChatShape(ResponseShape):
    id_prefix, whole_object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def opening(self, job, choice):
        return {"delta": {"role": "assistant", "content": ""}, "logprobs": None}

    def delta(self, text, entries, job, offset):
        return {"delta": {"content": text}, "logprobs": self._logprobs(entries) if job.logprobs else None}

    def closing(self):
        return {"delta": {}, "logprobs": None}

    def whole(self, text, entries, job, choice, tool_calls=None):
        message = {"role": "assistant", "content": text}
        if tool_calls:
            message = {"role": "assistant", "content": None, "tool_calls": self.calls(tool_calls)}
        return {"message": message, "logprobs": self._logprobs(entries) if job.logprobs else None}

    @staticmethod
    def calls(tool_calls: List[Dict[str, Any]], delta: bool = False) -> List[Dict[str, Any]]:
        """Calls in OpenAI's shape (with their `index`, in a stream's delta)."""
        return [{**({"index": i} if delta else {}), "id": f"call_{call['call_id'].replace('-', '')[:24]}",
                 "type": "function", "function": {"name": call["tool_name"],
                                                  "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
                for i, call in enumerate(tool_calls)]

    @staticmethod
    def _logprobs(entries: List[TokenEntry]) -> Dict[str, Any]:
        def entry(text: str, logprob: Optional[float], raw: Optional[bytes]) -> Dict[str, Any]:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8") if raw is None else raw)}

        return {"content": [{**entry(e.text, e.logprob, e.raw), "top_logprobs": [entry(*t) for t in e.top or []]}
                            for e in entries]}


class CompletionShape(ResponseShape):
    id_prefix, whole_object, chunk_object = "cmpl", "text_completion", "text_completion"

    def opening(self, job, choice):
        return {"text": choice.prompt_text, "logprobs": None} if job.echo else None

    def delta(self, text, entries, job, offset):
        return {"text": text, "logprobs": self._logprobs(entries, offset) if job.logprobs else None}

    def closing(self):
        return {"text": "", "logprobs": None}

    def whole(self, text, entries, job, choice, tool_calls=None):
        return {"text": choice.prompt_text + text, "logprobs": self._logprobs(entries, 0) if job.logprobs else None}

    @staticmethod
    def _logprobs(entries: List[TokenEntry], offset: int) -> Dict[str, Any]:
        """OpenAI's legacy logprobs; text_offset counts characters of the choice's text (the
        prompt's first, with echo), from `offset` on."""
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += len(e.text)
        return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [None if e.top is None else {t: lp for t, lp, _ in e.top} for e in entries],
                "text_offset": offsets}


CHAT, COMPLETION = ChatShape(), CompletionShape()


def prompt_entries(tokenizer: Tokenizer, prompt: Sequence[int], logprobs: List[float],
                   tops: Optional[List[List[Tuple[int, float]]]]) -> List[TokenEntry]:
    """The prompt's tokens as logprob entries (echo): the first has no logprob and no
    alternatives (nothing comes before it); the others their logprob given the tokens before
    them and, where asked, the most likely tokens at their position."""
    texts = token_texts(tokenizer, prompt)
    entries = [TokenEntry(texts[0], None)]
    for i in range(1, len(prompt)):
        top = None
        if tops is not None:
            top = [(token_text(tokenizer, t, prompt[:i]), lp, None) for t, lp in tops[i]]
        entries.append(TokenEntry(texts[i], logprobs[i], top))
    return entries
