"""OpenAI's HTTP API as data: a request body -> a checked job for the engine, and the job's
tokens -> the response objects and stream chunks of /v1/chat/completions and /v1/completions,
logprobs included. No HTTP and no engine here (llama.serve.app is the HTTP layer).

Errors are APIError, which the app turns into OpenAI's shape {"error": {"message", "type",
"param", "code"}}; argument checks use the engine's validation vocabulary
(llama.utils.checks), so a bad value gets the words it gets everywhere else.
"""

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..chat_format import ChatFormat
from ..detokenize import token_texts
from ..errors import LlamaError
from ..runtime.engine import MAX_TOP_LOGPROBS, Request, check_prompt
from ..runtime.sampling import check_sampling, request_key
from ..tokenizer import Tokenizer
from ..utils.checks import flag, whole_number

DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB of JSON: far more than any max_seq_len of text
COMPLETION_LOGPROBS_MAX = 5  # /v1/completions' `logprobs` (an int), as OpenAI's legacy API


class APIError(Exception):
    """An error answer in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- reading a request's arguments ----------------------------------------------------------

def _flag(body: Dict[str, Any], name: str) -> bool:
    try:
        return bool(flag(body.get(name), name, optional=True))
    except LlamaError as exc:
        raise APIError(400, str(exc), param=name) from None


def _whole(body: Dict[str, Any], name: str, low: int, high: Optional[int] = None) -> Optional[int]:
    """An integer argument in [low, high], or None when absent."""
    try:
        return whole_number(body.get(name), name, low, high, optional=True)
    except LlamaError as exc:
        raise APIError(400, str(exc), param=name) from None


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
class CompletionJob:
    """A checked request: what the engine runs and how the answer is to be written."""
    request: Request
    shape: "ResponseShape"
    stops: Tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool
    context: Sequence[int] = ()  # tokens the answer's text continues (a completion's prompt)
    prompt_text: str = ""  # /v1/completions with echo: the answer's text starts with it
    echo: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


class RequestReader:
    """Request bodies -> CompletionJobs for one model: its tokenizer, chat format and limits."""

    def __init__(self, tokenizer: Tokenizer, formatter: ChatFormat, max_seq_len: int, vocab_size: int,
                 model_name: str):
        self.tokenizer, self.formatter, self.model_name = tokenizer, formatter, model_name
        self.max_seq_len, self.vocab_size = max_seq_len, vocab_size

    def check_body(self, body: Any) -> Dict[str, Any]:
        """The parsed body, checked for what every endpoint takes (the model, n)."""
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"model={model!r:.80} is not served here; this server serves "
                                f"{self.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
        n = body.get("n")
        if n is not None and n != 1:
            raise APIError(400, f"n={n!r:.80}: this server gives one choice per request; leave n out (or 1) "
                                f"and send several requests", param="n")
        return body

    def chat_job(self, body: Dict[str, Any]) -> CompletionJob:
        job = self._job(body, self._dialog_tokens(body), self.formatter.stop_tokens, CHAT,
                        logprobs=_flag(body, "logprobs"), top=_whole(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0)
        if job.request.top_logprobs and not job.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        return job

    def completion_job(self, body: Dict[str, Any]) -> CompletionJob:
        prompt = self._prompt_tokens(body)
        top = _whole(body, "logprobs", 0, COMPLETION_LOGPROBS_MAX)
        echo = _flag(body, "echo")
        job = self._job(body, prompt, self.tokenizer.stop_tokens, COMPLETION, logprobs=top is not None,
                        top=top or 0, echo=echo)
        job.context, job.echo = prompt, echo
        job.prompt_text = self.tokenizer.decode(prompt) if echo else ""
        return job

    def _dialog_tokens(self, body: Dict[str, Any]) -> List[int]:
        """The chat prompt of `messages`, in the model's chat format."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list of {'role', 'content'} objects", param="messages")
        dialog = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
            content = message.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise APIError(400, f"messages[{i}].content: this model reads text parts only "
                                        f"({{'type': 'text', 'text': ...}})", param="messages")
                content = "".join(str(p.get("text", "")) for p in content)
            role = "system" if message.get("role") == "developer" else message.get("role")
            dialog.append({"role": role, "content": content})
        try:
            self.formatter.check_dialog(dialog)
        except LlamaError as exc:
            raise APIError(400, str(exc), param="messages") from None
        if self.formatter.is_unsafe(dialog):
            raise APIError(400, self.formatter.UNSAFE_ERROR, param="messages")
        return self.formatter.encode_dialog_prompt(dialog)

    def _prompt_tokens(self, body: Dict[str, Any]) -> List[int]:
        """`prompt`: a string, token ids, or a list of one of either."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise APIError(400, f"prompt={prompt!r:.80} must be a string or a list of token ids (one prompt per "
                            f"request: send several requests for several prompts)", param="prompt")

    def _job(self, body: Dict[str, Any], prompt: List[int], stop_tokens, shape: "ResponseShape", logprobs: bool,
             top: int, echo: bool = False) -> CompletionJob:
        """The engine request for `prompt` with the body's sampling arguments, checked."""
        temperature = 1.0 if body.get("temperature") is None else body["temperature"]  # OpenAI's defaults
        top_p = 1.0 if body.get("top_p") is None else body["top_p"]
        try:
            temperature, top_p, _ = check_sampling(temperature, top_p, None)
        except LlamaError as exc:
            raise APIError(400, str(exc), param=str(exc).partition("=")[0]) from None
        max_tokens = _whole(body, "max_completion_tokens", 1)
        max_tokens = _whole(body, "max_tokens", 1) if max_tokens is None else max_tokens
        seed = _whole(body, "seed", -2**63, 2**63 - 1)
        stops = split_stops(body.get("stop"))
        try:
            check_prompt(prompt, self.max_seq_len, self.vocab_size, "the prompt")
        except LlamaError as exc:
            code = "context_length_exceeded" if len(prompt) > self.max_seq_len else None
            raise APIError(400, str(exc), param="messages" if "messages" in body else "prompt", code=code) from None
        room = self.max_seq_len - len(prompt)
        if room == 0 or (max_tokens is not None and max_tokens > room):
            raise APIError(400, f"the prompt has {len(prompt)} tokens and max_tokens={max_tokens or 1} more are "
                                f"asked for, over this server's context of max_seq_len={self.max_seq_len} tokens; "
                                f"shorten the prompt or ask for fewer tokens", param="max_tokens",
                           code="context_length_exceeded")
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        # seed s samples as chat_completion([dialog], seed=s) does (the key of input position 0).
        key = 0 if temperature == 0 else request_key(seed, 0) if seed is not None else secrets.randbits(62)
        request = Request(prompt, max_tokens or room, temperature, top_p, key, tuple(stop_tokens),
                          logprobs, prompt_logprobs=echo and logprobs, top_logprobs=top)
        return CompletionJob(request, shape, stops, _flag(body, "stream"), include_usage, logprobs)


# ---- answers out -----------------------------------------------------------------------------

@dataclass
class TokenEntry:
    """One token of an answer as its logprob entry shows it: its text (the detokenizer's),
    logprob (None for a prompt's first token) and most likely alternatives (text, logprob)."""
    text: str
    logprob: Optional[float]
    top: Optional[List[Tuple[str, float]]] = None


@dataclass
class Piece:
    """Part of an answer: new text, the tokens it came from and, on the last piece, why the
    answer ended and the prompt's logprobs (echo)."""
    text: str
    tokens: List[TokenEntry]
    finish_reason: Optional[str] = None
    prompt_logprobs: Optional[List[float]] = None


def usage(job: CompletionJob, completion_tokens: int) -> Dict[str, int]:
    prompt = len(job.request.prompt_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


class ResponseShape:
    """How one endpoint writes an answer: whole (one object) or as stream chunks."""
    id_prefix: str
    whole_object: str
    chunk_object: str

    def opening(self, job: CompletionJob) -> Optional[Dict[str, Any]]:
        """The first chunk's choice fields, before any token (None: no such chunk)."""
        raise NotImplementedError

    def delta(self, text: str, entries: List[TokenEntry], job: CompletionJob, offset: int) -> Dict[str, Any]:
        """A chunk's choice fields for new text; `offset`: characters sent before it."""
        raise NotImplementedError

    def closing(self) -> Dict[str, Any]:
        """The choice fields of the chunk that carries finish_reason."""
        raise NotImplementedError

    def whole(self, text: str, entries: List[TokenEntry], job: CompletionJob) -> Dict[str, Any]:
        """The choice fields of a whole answer (entries: the prompt's first, with echo)."""
        raise NotImplementedError


class ChatShape(ResponseShape):
    id_prefix, whole_object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def opening(self, job):
        return {"delta": {"role": "assistant", "content": ""}, "logprobs": None}

    def delta(self, text, entries, job, offset):
        return {"delta": {"content": text}, "logprobs": self._logprobs(entries) if job.logprobs else None}

    def closing(self):
        return {"delta": {}, "logprobs": None}

    def whole(self, text, entries, job):
        return {"message": {"role": "assistant", "content": text},
                "logprobs": self._logprobs(entries) if job.logprobs else None}

    @staticmethod
    def _logprobs(entries: List[TokenEntry]) -> Dict[str, Any]:
        def entry(text: str, logprob: Optional[float]) -> Dict[str, Any]:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(e.text, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top or []]}
                            for e in entries]}


class CompletionShape(ResponseShape):
    id_prefix, whole_object, chunk_object = "cmpl", "text_completion", "text_completion"

    def opening(self, job):
        return {"text": job.prompt_text, "logprobs": None} if job.echo else None

    def delta(self, text, entries, job, offset):
        return {"text": text, "logprobs": self._logprobs(entries, offset) if job.logprobs else None}

    def closing(self):
        return {"text": "", "logprobs": None}

    def whole(self, text, entries, job):
        return {"text": job.prompt_text + text, "logprobs": self._logprobs(entries, 0) if job.logprobs else None}

    @staticmethod
    def _logprobs(entries: List[TokenEntry], offset: int) -> Dict[str, Any]:
        """OpenAI's legacy logprobs; text_offset counts characters of the answer's text (the
        prompt's first, with echo), from `offset` on."""
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += len(e.text)
        return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [None if e.top is None else dict(e.top) for e in entries],
                "text_offset": offsets}


CHAT, COMPLETION = ChatShape(), CompletionShape()


def prompt_entries(tokenizer: Tokenizer, job: CompletionJob, prompt_logprobs: List[float]) -> List[TokenEntry]:
    """The prompt's tokens as logprob entries (echo): the first has no logprob (no context),
    and no alternatives are computed for prompt tokens."""
    texts = token_texts(tokenizer, job.request.prompt_tokens)
    return [TokenEntry(text, lp if i else None) for i, (text, lp) in enumerate(zip(texts, prompt_logprobs))]
