"""The scheduler: token requests in, tokens out, over the rows of the static KV cache.

An Engine keeps a queue of waiting requests and up to max_batch_size active ones, each in its
own cache row. Every step():
  1. admits waiting requests into free rows (continuous batching: a row that a finished request
     left takes the next waiting request at once; policy "static" admits only when every row
     is free, i.e. chunk by chunk, for comparison);
  2. prefills the newcomers, all in one forward pass, a long prompt in chunks of prefill_chunk
     tokens per step so that decoding rows are not stalled for long; a request whose prompt is
     complete samples its first token;
  3. decodes one token for every request that has one pending, all in one forward pass, each
     row at its own position: the model's forward pass, or the native decode step where
     llama.runtime.backend measured it faster for this model on this machine (same cache rows).
It returns the step's events: new tokens and finished requests with their reason.

Prefix caching: a row keeps the keys and values it holds after its request finishes, and the
engine remembers which tokens they are (`_content`). A newcomer takes the free row that holds
the longest beginning of its prompt (the lowest among equals) and prefills only the
rest; when another row (busy or free) holds a longer one, those positions are copied into the
newcomer's row first (a memory copy, far cheaper than computing them). A newcomer whose prompt
shares a long beginning with a prompt still being prefilled waits for it (several samples of
one prompt, jobs with one system prompt): one prefill serves them all. Reused positions hold
what prefill computed for the same tokens, so results are those of a run without reuse (to
rounding in bf16, where other batch shapes round differently). Rows are the store: it holds
max_batch_size prefixes and costs no memory; Engine(prefix_cache=False) turns it off.

Prompt-lookup speculative decoding (opt-in: Engine(prompt_lookup_num_tokens=k), HF's name): a
row whose last tokens occurred earlier in its prompt or answer drafts the k tokens that
followed them there; one forward pass over [its last token, the draft] at its positions gives
the logits after each, and the row samples each position as it would have decoding one token
at a time (argmax when greedy; else the race with its key and that token's step, a function
of the logits, the key and the step alone). The draft is kept up to the first position whose
token differs, plus that token: 1 to k + 1 tokens for one pass, each the very token decoding
one at a time gives (to the rounding of another pass shape). So sampling keeps its
distribution, and its exact samples: a draft token is kept with its probability, and a
rejected one is replaced by a draw that excludes it, the standard accept/reject rule for a
draft that is one fixed token. Rows with controls or top_logprobs decode one token as usual,
in the same pass. With a draft model (Engine(draft_model=..., num_assistant_tokens=k), a
smaller model of the same vocabulary), the draft is instead the draft model's greedy
continuation, k tokens, verified the same way: what the draft model says changes only the
speed, never a token. The draft model keeps its own cache rows, mirroring the rows' tokens
(`_draft_content`), and catches up on what it has not seen (a new prompt, the tokens the model
kept) in one pass before drafting.

A request's tokens do not depend on the schedule, its batch mates or max_batch_size: rows never
see each other (per-row positions and masks), and each request samples with its own key,
sampling arguments and controls (llama.runtime.sampling: its logit_bias, penalties over its
own tokens, top_k and min_p), so it gets what it would get alone (exactly in fp32 on one decode backend;
the native step and PyTorch's forward agree within about 1e-4, and the measured choice may
differ between batch sizes; in bf16 matmul kernels may round differently for different batch
shapes).

Under model parallelism every rank must make the same calls (submit, cancel, step) in the same
order; the engine is deterministic, so the ranks then run the same forward passes. The engine
is not thread-safe: one thread drives it (llama.generation.Llama holds a lock around it).
"""

import collections
import time
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import LlamaError
from ..model import Transformer
from ..model.parallel import measured_small_products
from ..utils.checks import one_of_choices, token_ids, whole_number
from . import backend
from .memory import PREFILL_TOKENS_PER_PASS, SCORED_TOKENS_PER_PASS
from .static_step import RowInput, StaticDecodeStep, bucket, graphs_available
from .sampling import ControlState, SamplingControls, check_sampling, sample, token_logprobs

POLICIES = ("continuous", "static")
# Which rows a decode pass computes: "prefix" rows 0..(highest busy row) of the cache in place,
# free rows in between riding along; "active" only the busy rows, whose cache rows are then
# gathered (copied) for attention; "all" every row (docs/batching.md has the measurement).
# This is for the model's forward pass; the native decode step (llama.runtime.backend) computes
# the busy rows only, in place.
DECODE_ROWS = ("prefix", "active", "all")
MAX_TOP_LOGPROBS = 20  # as OpenAI's API
# A newcomer waits for a prompt being prefilled (or copies from another row rather than use its
# own row's match) only for at least this many more reusable tokens: less is not worth a step.
MIN_SHARED_PREFIX = 16
LOOKUP_NGRAMS = (3, 2, 1)  # prompt lookup: the longest recent n-gram found earlier drafts what followed it


@dataclass
class Request:
    """One prompt to continue. key: the sampling key (llama.runtime.sampling.request_key), which
    with the prompt and the sampling arguments fixes the result; unused at temperature 0.
    controls: top_k, min_p, penalties, logit_bias (llama.runtime.sampling; off by default)."""
    prompt_tokens: List[int]
    max_gen_len: int
    temperature: float = 0.6
    top_p: float = 0.9
    key: int = 0
    stop_tokens: Sequence[int] = ()
    logprobs: bool = False
    prompt_logprobs: bool = False  # also score each prompt token given those before it (echo)
    top_logprobs: int = 0  # also report this many most likely tokens per step, with their logprobs
    controls: SamplingControls = SamplingControls()


class Handle:
    """A submitted request and its results so far. finish_reason: None while it runs, then
    "stop" (a stop token, not included; or its stop check said so, and the token it was
    given is included), "length" (its budget: max_gen_len, or the room left in max_seq_len),
    "cancelled" or "error" (then `error` holds the exception)."""

    def __init__(self, ident: int, request: Request, budget: int,
                 stop_check: Optional[Callable[[int], bool]] = None):
        self.id = ident
        self.request = request
        self.budget = budget  # most tokens it may generate
        self.tokens: List[int] = []
        self.logprobs: List[float] = []
        self.prompt_logprobs: Optional[List[float]] = [0.0] if request.prompt_logprobs else None
        # With prompt_logprobs and top_logprobs: the most likely tokens at each prompt position
        # (none at the first: nothing comes before it).
        self.prompt_top_logprobs: Optional[List[List[Tuple[int, float]]]] = \
            [[]] if request.prompt_logprobs and request.top_logprobs else None
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.row: Optional[int] = None  # its cache row while active
        self.prefilled = 0  # prompt tokens already in the cache
        self._stops = frozenset(request.stop_tokens)
        self._stop_check = stop_check
        self.controlled = request.controls.active  # asked once here, not at every step
        self._controls: Optional[ControlState] = None  # made at its first sample, if it has controls

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return f"Handle(id={self.id}, tokens={len(self.tokens)}, finish_reason={self.finish_reason!r})"


@dataclass
class Event:
    """What one step did for one request: a new token (None when the step only finished it,
    e.g. at a stop token) and, on its last event, why it finished."""
    handle: Handle
    token: Optional[int]
    logprob: float = 0.0
    finish_reason: Optional[str] = None
    top: Optional[List[Tuple[int, float]]] = None  # the most likely tokens, if the request asked
    # A stop token that ended the request (never in its tokens); logprob and top are its own.
    stop_token: Optional[int] = None


@dataclass
class EngineStats:
    """Counters since the engine was made (or reset): forward passes and the rows they computed."""
    prefill_passes: int = 0
    prefill_tokens: int = 0  # prompt tokens prefilled
    prefill_padded: int = 0  # tokens computed by prefill passes, padding included
    decode_passes: int = 0
    decode_rows: int = 0  # rows computed by decode passes
    decode_useful: int = 0  # of which rows that decoded a request's token
    generated: int = 0  # tokens sampled (stop tokens included)
    prefix_reused: int = 0  # prompt tokens not prefilled: their keys and values were in a cache row
    prefix_copied: int = 0  # of which copied from another row
    drafted_rows: int = 0  # prompt lookup: rows that decoded a draft (one per row and step)
    draft_tokens: int = 0  # tokens drafted
    draft_accepted: int = 0  # of which the model chose too
    busy_s: float = 0.0  # time spent in step()

    @property
    def useful_fraction(self) -> float:
        return self.decode_useful / self.decode_rows if self.decode_rows else 0.0


def check_prompt(tokens: Sequence[int], max_seq_len: int, vocab_size: int, where: str) -> List[int]:
    """A prompt's token ids as a list, or a LlamaError naming `where`. A prompt may fill the
    whole context (max_seq_len tokens): it then generates nothing, as in Meta's code."""
    tokens = token_ids(tokens, vocab_size, where)
    if len(tokens) > max_seq_len:
        raise LlamaError(f"{where} has {len(tokens)} tokens, {len(tokens) - max_seq_len} too many for "
                         f"max_seq_len={max_seq_len}; shorten it or build with a larger max_seq_len")
    return tokens


class Engine:
    """Continuous batching over a model's KV cache rows (see the module docstring)."""

    def __init__(self, model: Transformer, policy: str = "continuous", prefill_chunk: int = 512,
                 decode_rows: str = "prefix", prefix_cache: bool = True, prompt_lookup_num_tokens: int = 0,
                 draft_model: Optional[Transformer] = None, num_assistant_tokens: int = 5,
                 static_decode: Optional[bool] = None):
        self.model = model
        self.policy = one_of_choices(policy, POLICIES, "policy")
        self.prefill_chunk = whole_number(prefill_chunk, "prefill_chunk", low=1)
        self.decode_rows = one_of_choices(decode_rows, DECODE_ROWS, "decode_rows")
        if not isinstance(prefix_cache, bool):
            raise LlamaError(f"prefix_cache={prefix_cache!r:.40} must be True or False")
        self.prefix_cache = prefix_cache
        if static_decode not in (None, True, False):
            raise LlamaError(f"static_decode={static_decode!r:.40} must be True, False or None (automatic)")
        self.static_decode = static_decode
        self._static: Optional[Tuple[object, Optional[StaticDecodeStep]]] = None  # (its caches, the step)
        self.prompt_lookup_num_tokens = whole_number(prompt_lookup_num_tokens, "prompt_lookup_num_tokens", low=0,
                                                     high=64)
        self.draft_model = draft_model
        self.num_assistant_tokens = whole_number(num_assistant_tokens, "num_assistant_tokens", low=1, high=64)
        if draft_model is not None:
            if draft_model.params.vocab_size != model.params.vocab_size:
                raise LlamaError(f"the draft model has a vocabulary of {draft_model.params.vocab_size} tokens, the "
                                 f"model {model.params.vocab_size}; a draft model must share the model's tokenizer")
            if draft_model.layers[0].attention.cache.k.shape[:2] != model.layers[0].attention.cache.k.shape[:2]:
                raise LlamaError("the draft model's cache must have the model's max_batch_size and max_seq_len")
        self._draft_content: List[List[int]] = [[] for _ in range(model.params.max_batch_size)]
        self.params = model.params
        self.waiting: Deque[Handle] = collections.deque()
        self.rows: List[Optional[Handle]] = [None] * model.params.max_batch_size  # each row's request
        # Per row, the tokens whose keys and values it holds at positions 0..n-1 (kept after its
        # request ends: the prefix cache).
        self._content: List[List[int]] = [[] for _ in self.rows]
        # The caches _content describes, and their write count after the engine's last step: a
        # forward pass run outside the engine (Meta's loop on generator.model) makes it stale.
        self._content_for: Optional[Tuple[object, int]] = None
        self.stats = EngineStats()
        self._next_id = 0
        self._events: List[Event] = []  # reported by the next step (cancellations)
        # The decode backend, asked of llama.runtime.backend at the first decode (a measured
        # choice) and again only if the model's caches are replaced: (the caches it is for, the step).
        self._decode_backend: Optional[Tuple[object, Optional[backend.NativeDecodeStep]]] = None
        self._prompt_attention_for: Optional[object] = None  # the caches it was chosen for

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def idle(self) -> bool:
        """Nothing waiting, nothing running."""
        return not self.waiting and all(h is None for h in self.rows)

    # ---- requests in and out --------------------------------------------------------------

    def submit(self, request: Request, where: Optional[str] = None,
               stop_check: Optional[Callable[[int], bool]] = None) -> Handle:
        """Queue a request (checked first: LlamaError naming `where`, default "request N").
        stop_check, if given, is called with each token the request generates (stop tokens
        excepted), in order, once the token is recorded; True ends the request there, that
        token included, with finish_reason "stop" (the library's stop strings). It runs inside
        step(), on every rank alike."""
        where = where or f"request {self._next_id}"
        params = self.params
        prompt = check_prompt(request.prompt_tokens, params.max_seq_len, params.vocab_size, where)
        # Nothing to generate: the prompt alone (scored, with prompt_logprobs; else it finishes at once).
        prompt_only = request.max_gen_len == 0 and not isinstance(request.max_gen_len, bool)
        temperature, top_p, max_gen_len = check_sampling(request.temperature, request.top_p,
                                                         None if prompt_only else request.max_gen_len,
                                                         f"{where}: ")
        if prompt_only:
            max_gen_len = 0
        elif max_gen_len is None:
            raise LlamaError(f"{where}: max_gen_len must be a positive integer")
        key = whole_number(request.key, f"{where}: key", low=0, high=2**63 - 1)
        top = whole_number(request.top_logprobs, f"{where}: top_logprobs", low=0, high=MAX_TOP_LOGPROBS)
        if not isinstance(request.controls, SamplingControls):
            raise LlamaError(f"{where}: controls={request.controls!r:.80} must be a SamplingControls")
        controls = request.controls.within(params.vocab_size, f"{where}: ")
        request = Request(prompt, max_gen_len, temperature, top_p, key, tuple(request.stop_tokens),
                          bool(request.logprobs or top), bool(request.prompt_logprobs), top, controls)
        handle = Handle(self._next_id, request, min(max_gen_len, params.max_seq_len - len(prompt)), stop_check)
        self._next_id += 1
        self.waiting.append(handle)
        return handle

    def cancel(self, handle: Handle) -> None:
        """Stop a request now: a waiting one leaves the queue, a running one frees its row at
        once. Its "cancelled" event comes with the next step. No-op once it has finished."""
        if handle.done:
            return
        if handle.row is None:
            self.waiting.remove(handle)
        self._finish(handle, "cancelled", self._events)

    def _finish(self, handle: Handle, reason: str, events: List[Event], token: Optional[int] = None,
                logprob: float = 0.0, top: Optional[List[Tuple[int, float]]] = None,
                stop_token: Optional[int] = None) -> None:
        handle.finish_reason = reason
        handle._controls = None  # its tensors are not needed any more
        if handle.row is not None:
            self.rows[handle.row] = None
            handle.row = None
        events.append(Event(handle, token, logprob, reason, top, stop_token))

    # ---- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> List[Event]:
        """Admit, prefill, decode (see the module docstring); the events of this step.

        If the step fails (an interrupt, out of memory, a failed collective), every running
        request ends with finish_reason "error" and the exception, which is raised again: the
        engine stays usable."""
        start = time.perf_counter()
        events, self._events = self._events, []
        try:
            self._admit(events)
            self._prefill(events)
            self._decode(events)
            cache = self.model.layers[0].attention.cache
            self._content_for = (cache, cache.writes)
        except BaseException as exc:
            for handle in self.rows:
                if handle is not None:
                    handle.error = exc
                    self._finish(handle, "error", events)
            self._forget_content()  # a pass that failed may have written rows half-way
            raise
        finally:
            self.stats.busy_s += time.perf_counter() - start
        return events

    def _admit(self, events: List[Event]) -> None:
        """Waiting requests into free rows, in order, each where most of its prompt is cached."""
        if self.policy == "static" and any(h is not None for h in self.rows):
            return
        cache = self.model.layers[0].attention.cache
        if self._content_for != (cache, cache.writes):  # new caches, or written by someone else
            self._forget_content()
        while self.waiting and None in self.rows:
            handle = self.waiting[0]
            if handle.budget == 0 and handle.prompt_logprobs is None:
                self.waiting.popleft()
                self._finish(handle, "length", events)  # a prompt that fills the context: nothing to do
                continue
            place = self._place(handle)
            if place is None:
                return  # it waits for a prompt being prefilled, which it shares
            row, source, reused = place
            self.waiting.popleft()
            if source != row:
                for layer in self.model.layers:
                    cache = layer.attention.cache
                    cache.k[row, :reused] = cache.k[source, :reused]
                    cache.v[row, :reused] = cache.v[source, :reused]
                self.stats.prefix_copied += reused
            self._content[row] = list(handle.request.prompt_tokens[:reused])
            self.stats.prefix_reused += reused
            handle.prefilled = reused
            handle.row = row
            self.rows[row] = handle

    def _place(self, handle: Handle) -> Optional[Tuple[int, int, int]]:
        """Where a newcomer goes: (its row, the row whose cached keys and values it starts from,
        how many positions of its prompt they cover), or None if it should wait for a prompt
        being prefilled that holds much more of its own. The last prompt token is always
        prefilled (its logits give the first token), and an echo request prefills everything
        (its prompt's logprobs are computed then)."""
        free = [r for r, h in enumerate(self.rows) if h is None]
        if not self.prefix_cache:
            return free[0], free[0], 0  # the lowest: keeps the busy rows a prefix
        prompt = handle.request.prompt_tokens
        if handle.prompt_logprobs is not None or len(prompt) < 2:
            return free[0], free[0], 0
        limit = len(prompt) - 1
        match = [_shared(prompt, content, limit) for content in self._content]
        row = max(free, key=lambda r: (match[r], -r))  # among equals the lowest: busy rows stay a prefix
        source = max(range(len(self.rows)), key=lambda r: match[r])
        if match[source] < match[row] + MIN_SHARED_PREFIX:
            source = row
        coming = max((_shared(prompt, h.request.prompt_tokens, limit) for h in self.rows
                      if h is not None and h.prefilled < len(h.request.prompt_tokens)), default=0)
        if coming >= match[source] + MIN_SHARED_PREFIX:
            return None
        return row, source, match[source]

    def _forget_content(self) -> None:
        """Nothing cached can be reused any more (new caches, or a failed pass)."""
        self._content = [[] for _ in self.rows]

    def _forward(self, tokens: torch.Tensor, start_pos, model: Optional[Transformer] = None,
                 **kwargs) -> torch.Tensor:
        """The model (or `model`, the draft model) on tokens [B, S], with the matmul kernels
        chosen for that shape."""
        with backend.matmul_policy(tokens):
            return (model or self.model)(tokens, start_pos, **kwargs)

    def _padded(self, feeds: List[List[int]]) -> torch.Tensor:
        """Rows of token ids of different lengths as one [B, longest] tensor on the device, 0 after each."""
        tokens = torch.zeros((len(feeds), max(len(f) for f in feeds)), dtype=torch.long)
        for i, feed in enumerate(feeds):
            tokens[i, : len(feed)] = torch.tensor(feed, dtype=torch.long)
        return tokens.to(self.device)

    def _tensor(self, values: List[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _prefill(self, events: List[Event]) -> None:
        """The next prompt chunk of every row still prefilling, in one forward pass."""
        batch = [h for h in self.rows if h is not None and h.prefilled < len(h.request.prompt_tokens)]
        if not batch:
            return
        chunks = [h.request.prompt_tokens[h.prefilled: h.prefilled + self.prefill_chunk] for h in batch]
        # At most PREFILL_TOKENS_PER_PASS tokens, padding included, or SCORED_TOKENS_PER_PASS with
        # a prompt to score (the activations a build leaves room for); the first row always goes,
        # the rest wait for the next step.
        most = SCORED_TOKENS_PER_PASS if any(h.prompt_logprobs is not None for h in batch) else PREFILL_TOKENS_PER_PASS
        budget, width = max(most, self.prefill_chunk), 0
        for count, chunk in enumerate(chunks):
            if count and max(width, len(chunk)) * (count + 1) > budget:
                batch, chunks = batch[:count], chunks[:count]
                break
            width = max(width, len(chunk))
        tokens = self._padded(chunks)
        width = tokens.shape[1]
        self._choose_prompt_attention()
        cache_rows = [h.row for h in batch]
        starts = [h.prefilled for h in batch]
        fresh = not any(starts)  # every row starts at 0: plain causal attention, no cache reads
        scored = any(h.prompt_logprobs is not None for h in batch)  # echo logprobs need every position
        last = [len(c) - 1 for c in chunks]
        logits = self._forward(
            tokens, 0 if fresh else self._tensor(starts),
            kv_len=width if fresh else max(s + len(c) for s, c in zip(starts, chunks)),
            last_index=None if scored else self._tensor(last),
            rows=None if cache_rows == list(range(len(batch))) else self._tensor(cache_rows))
        self.stats.prefill_passes += 1
        self.stats.prefill_tokens += sum(len(c) for c in chunks)
        self.stats.prefill_padded += tokens.numel()

        complete, complete_logits = [], []
        for i, (handle, chunk) in enumerate(zip(batch, chunks)):
            row_logits = logits[i, last[i]] if scored else logits[i]
            if handle.prompt_logprobs is not None:
                prompt = handle.request.prompt_tokens
                targets = prompt[handle.prefilled + 1: handle.prefilled + 1 + len(chunk)]
                if targets:
                    scores = torch.log_softmax(logits[i, : len(targets)].float(), dim=-1)
                    handle.prompt_logprobs += scores.gather(1, self._tensor(targets).unsqueeze(1)).squeeze(1).tolist()
                    if handle.prompt_top_logprobs is not None:
                        values, ids = scores.topk(handle.request.top_logprobs, dim=-1)
                        handle.prompt_top_logprobs += [list(zip(a, b)) for a, b in zip(ids.tolist(), values.tolist())]
            handle.prefilled += len(chunk)
            self._content[handle.row].extend(chunk)
            if handle.prefilled == len(handle.request.prompt_tokens):
                if handle.budget == 0:
                    self._finish(handle, "length", events)
                else:
                    complete.append(handle)
                    complete_logits.append(row_logits)
        if complete:
            self._sample(complete, torch.stack(complete_logits), events)

    def _choose_prompt_attention(self) -> None:
        """The dtype and kernel of prompts' attention, asked of llama.runtime.backend (a measured
        choice) once per model and caches, before the first prefill."""
        caches = self.model.layers[0].attention.cache
        if self._prompt_attention_for is not caches:
            dtype = backend.prompt_attention_dtype(self.model)
            native = dtype is not None and backend.prompt_attention_native(self.model)
            for layer in self.model.layers:
                layer.attention.prompt_attention_dtype = dtype
                layer.attention.prompt_attention_native = native
            self._prompt_attention_for = caches

    def _native_step(self) -> Optional[backend.NativeDecodeStep]:
        """The decode step llama.runtime.backend chose for this model on this machine, or None
        for the model's own forward pass. Asked once (it may time both backends the first time)."""
        caches = self.model.layers[0].attention.cache
        if self._decode_backend is None or self._decode_backend[0] is not caches:
            self._decode_backend = (caches, backend.choose_decode_step(self.model, len(self.rows)))
        return self._decode_backend[1]

    def _static_step(self) -> Optional[StaticDecodeStep]:
        """The fixed-shape decode step (llama.runtime.static_step), captured as CUDA graphs where
        the device allows; None where static_decode is off (by default: where it cannot capture)."""
        caches = self.model.layers[0].attention.cache
        if self._static is None or self._static[0] is not caches:
            capture = graphs_available(self.model)
            wanted = capture if self.static_decode is None else self.static_decode
            self._static = (caches, StaticDecodeStep(self.model, capture) if wanted else None)
        return self._static[1]

    def _decode_static(self, step: StaticDecodeStep, batch: List[Handle], positions: Dict[int, int],
                       events: List[Event]) -> None:
        """One token for each decoding row from the fixed-shape step over rows 0..(highest busy
        row): free rows ride along at their last position, prefilling ones at their next."""
        busy = {h.row: h for h in batch}
        inputs = []
        for row in range(max(busy) + 1):
            handle = busy.get(row)
            if handle is None:  # free, or still prefilling: a position written again before it is read
                other = self.rows[row]
                pending = other.prefilled if other is not None else self.params.max_seq_len - 1
                inputs.append(RowInput(0, min(pending, self.params.max_seq_len - 1)))
            else:
                request = handle.request
                inputs.append(RowInput(handle.tokens[-1], positions[row], request.key, len(handle.tokens),
                                       request.temperature, request.top_p))
        outputs = step(inputs, max(positions.values()) + 1)
        self.stats.decode_passes += 1
        self.stats.decode_rows += bucket(len(inputs), len(self.rows))
        self.stats.decode_useful += len(batch)
        now = time.perf_counter()
        again = []  # non-finite logits (reported as an error) or a nucleus past the step's candidates
        for handle in batch:
            self._content[handle.row].append(inputs[handle.row].token)  # in the cache now
            out = outputs[handle.row]
            if out.finite and out.settled:
                self._record(handle, out.token, out.logprob, None, events, now)
            else:
                again.append(handle)
        if again:
            self._sample(again, torch.stack([step.logits(h.row) for h in again]), events)

    def _decode(self, events: List[Event]) -> None:
        """One token for every row whose latest token is pending, in one forward pass."""
        batch = [h for h in self.rows
                 if h is not None and h.tokens and h.prefilled == len(h.request.prompt_tokens)]
        if not batch:
            return
        positions = {h.row: len(h.request.prompt_tokens) + len(h.tokens) - 1 for h in batch}
        drafts = self._drafts(batch, positions) if self.prompt_lookup_num_tokens or self.draft_model else {}
        if drafts:
            self._decode_drafts(batch, positions, drafts, events)
            return
        static = self._static_step()
        if static is not None and not any(h.controlled or h.request.top_logprobs for h in batch):
            self._decode_static(static, batch, positions, events)
            return
        step = self._native_step()
        if step is not None and step.wants(len(batch)):
            # One call over just the busy rows, reading and writing their rows of the same
            # caches that prefill wrote.
            cache_rows = [h.row for h in batch]
            logits = step(self._tensor([h.tokens[-1] for h in batch]),
                          self._tensor([positions[r] for r in cache_rows]), self._tensor(cache_rows))
            computed = len(batch)
        else:
            logits, computed = self._decode_forward(batch, positions)
        self.stats.decode_passes += 1
        self.stats.decode_rows += computed
        self.stats.decode_useful += len(batch)
        for handle in batch:  # its latest token is in the cache now
            self._content[handle.row].append(handle.tokens[-1])
        self._sample(batch, logits, events)

    def _drafts(self, batch: List[Handle], positions: Dict[int, int]) -> Dict[int, List[int]]:
        """Prompt lookup: row -> the tokens that followed the latest earlier occurrence of the
        row's last n tokens (n from LOOKUP_NGRAMS), for rows without controls (penalties would
        count draft tokens) or top logprobs; at most prompt_lookup_num_tokens, within the row's
        budget, and within the context for every row of the pass (padding past max_seq_len
        would be clamped onto a real position)."""
        room = self.params.max_seq_len - 1 - max(positions.values())
        length = self.num_assistant_tokens if self.draft_model is not None else self.prompt_lookup_num_tokens
        wanted = {}  # row -> (the row's handle, the most tokens it may draft)
        for h in batch:
            if h.controlled or h.request.top_logprobs:
                continue
            most = min(length, h.budget - len(h.tokens) - 1, room)
            if most > 0:
                wanted[h.row] = (h, most)
        if self.draft_model is not None:
            return self._model_drafts(wanted)
        drafts = {}
        for h, most in wanted.values():
            context = h.request.prompt_tokens + h.tokens
            for n in LOOKUP_NGRAMS:
                if len(context) <= n:
                    continue
                tail = context[-n:]
                # the latest earlier occurrence, searched backwards from just before the tail
                for start in range(len(context) - n - 1, -1, -1):
                    if context[start: start + n] == tail:
                        draft = context[start + n: start + n + most]
                        if draft:
                            drafts[h.row] = draft
                        break
                if h.row in drafts:
                    break
        return drafts

    def _model_drafts(self, wanted: Dict[int, Tuple[Handle, int]]) -> Dict[int, List[int]]:
        """The draft model's greedy continuation of each wanted row (row -> (handle, most)): one
        pass over what its cache row lacks of the row's tokens (all but the last, pending,
        token are in the model's row), then one pass per further draft token."""
        if not wanted:
            return {}
        draft, content = self.draft_model, self._draft_content
        rows = sorted(wanted)
        contexts = {r: wanted[r][0].request.prompt_tokens + wanted[r][0].tokens for r in rows}
        seen = {r: _shared(contexts[r], content[r], len(contexts[r]) - 1) for r in rows}
        feeds = [contexts[r][seen[r]:] for r in rows]
        starts = [seen[r] for r in rows]
        cache_rows = self._tensor(rows)
        logits = self._forward(self._padded(feeds), self._tensor(starts), draft,
                               kv_len=max(s + len(f) for s, f in zip(starts, feeds)),
                               last_index=self._tensor([len(f) - 1 for f in feeds]), rows=cache_rows)
        drafted = {r: [] for r in rows}
        for r in rows:
            content[r] = list(contexts[r])
        longest = max(most for _, most in wanted.values())
        for step in range(longest):
            chosen = logits.argmax(dim=-1).tolist()
            for r, token in zip(rows, chosen):
                drafted[r].append(token)
            if step == longest - 1:
                break
            fed = self._tensor(chosen).unsqueeze(1)
            positions = self._tensor([len(contexts[r]) + step for r in rows])
            logits = self._forward(fed, positions, draft, kv_len=int(positions.max()) + 1, rows=cache_rows)[:, -1]
            for r, token in zip(rows, chosen):
                content[r].append(token)
        return {r: drafted[r][: wanted[r][1]] for r in rows}

    def _decode_drafts(self, batch: List[Handle], positions: Dict[int, int], drafts: Dict[int, List[int]],
                       events: List[Event]) -> None:
        """One pass over every decoding row: its last token and its draft, if it has one (padded to
        the longest); rows without a draft sample from their first position as usual."""
        feeds = [[h.tokens[-1]] + drafts.get(h.row, []) for h in batch]
        starts = [positions[h.row] for h in batch]
        with measured_small_products():  # a few rows: not PyTorch's GEMM, which reads weights slowly there
            logits = self._forward(self._padded(feeds), self._tensor(starts),
                                   kv_len=max(s + len(f) for s, f in zip(starts, feeds)),
                                   rows=self._tensor([h.row for h in batch]))  # [B, width, V]
        self.stats.decode_passes += 1
        self.stats.decode_rows += len(batch)
        self.stats.decode_useful += len(batch)
        plain = [i for i, h in enumerate(batch) if h.row not in drafts]
        drafting = [i for i, h in enumerate(batch) if h.row in drafts]
        for i in plain:
            self._content[batch[i].row].append(feeds[i][0])
        if plain:
            self._sample([batch[i] for i in plain], logits[self._tensor(plain), 0], events)
        if not drafting:
            return
        # Every drafting row's token at each fed position, as decoding one at a time samples it:
        # the same key, the step that token would have had.
        sizes = [len(feeds[i]) for i in drafting]
        flat = torch.cat([logits[i, : len(feeds[i])] for i in drafting])
        requests = [batch[i].request for i in drafting]

        def each(values: List) -> List:
            return [v for v, size in zip(values, sizes) for _ in range(size)]

        steps = [len(batch[i].tokens) + j for i in drafting for j in range(len(feeds[i]))]
        chosen_flat = sample(flat, torch.tensor(each([r.temperature for r in requests]), device=self.device),
                             torch.tensor(each([r.top_p for r in requests]), device=self.device),
                             self._tensor(each([r.key for r in requests])), self._tensor(steps)).tolist()
        finite = torch.isfinite(flat.sum(dim=-1)).tolist()
        now = time.perf_counter()
        offset = 0
        for i, size in zip(drafting, sizes):
            handle, feed = batch[i], feeds[i]
            row_logits, chosen = flat[offset: offset + size], chosen_flat[offset: offset + size]
            row_finite = finite[offset: offset + size]
            offset += size
            if not all(row_finite):
                self._content[handle.row].append(feed[0])
                self._sample([handle], row_logits[:1], events)  # reports the error as a plain step does
                continue
            accepted = next((j for j, token in enumerate(feed[1:]) if chosen[j] != token), len(feed) - 1)
            new = chosen[: accepted + 1]  # the accepted draft tokens are the model's choices too
            scores = token_logprobs(row_logits[: accepted + 1], self._tensor(new)).tolist() \
                if handle.request.logprobs else [0.0] * len(new)
            self._content[handle.row].extend(feed[: accepted + 1])  # positions whose inputs were right
            self.stats.drafted_rows += 1
            self.stats.draft_tokens += len(feed) - 1
            self.stats.draft_accepted += accepted
            for token, logprob in zip(new, scores):
                if not self._record(handle, token, logprob, None, events, now):
                    break

    def _decode_forward(self, batch: List[Handle], positions: Dict[int, int]) -> Tuple[torch.Tensor, int]:
        """The model's forward pass over the decode_rows rows: (the busy rows' logits [N, V],
        how many rows it computed)."""
        kv_len = max(positions.values()) + 1
        if self.decode_rows == "active":
            computed = [h.row for h in batch]
            cache_rows = self._tensor(computed)
        else:
            computed = list(range(len(self.rows) if self.decode_rows == "all" else max(positions) + 1))
            cache_rows = None
        # Rows that ride along (free, or still prefilling) feed token 0 at a position that is
        # written again before it is ever read: a prefilling row's next chunk, a free row's last
        # position (never reused: a prompt is at most max_seq_len tokens, and its last is prefilled).
        last_token = {h.row: h.tokens[-1] for h in batch}
        pending = [h.prefilled if h is not None else self.params.max_seq_len - 1 for h in self.rows]
        tokens = self._tensor([last_token.get(r, 0) for r in computed]).unsqueeze(1)
        starts = self._tensor([positions.get(r, min(pending[r], self.params.max_seq_len - 1)) for r in computed])
        logits = self._forward(tokens, starts, kv_len=kv_len, rows=cache_rows)[:, -1]
        if cache_rows is None:
            logits = logits[self._tensor([h.row for h in batch])] if len(batch) < len(computed) else logits
        return logits, len(computed)

    def _sample(self, batch: List[Handle], logits: torch.Tensor, events: List[Event]) -> None:
        """Each row's next token from its logits [N, V]; record it or finish the row."""
        finite = torch.isfinite(logits.sum(dim=-1)).tolist()  # one reduction per row
        if not all(finite):
            dtype = self.model.norm.weight.dtype
            for handle, ok in zip(batch, finite):
                if not ok:
                    handle.error = LlamaError(
                        f"the model produced NaN or inf logits (model dtype {dtype}); the usual cause is "
                        f"fp16 overflow: build with dtype='bf16' or dtype='fp32'")
                    self._finish(handle, "error", events)
            keep = [i for i, ok in enumerate(finite) if ok]
            batch, logits = [batch[i] for i in keep], logits[self._tensor(keep)]
            if not batch:
                return
        requests = [h.request for h in batch]
        device = self.device
        sampled, min_p, top_k = self._controlled(batch, logits)
        next_tokens = sample(
            sampled,
            torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=device),
            torch.tensor([r.top_p for r in requests], dtype=torch.float32, device=device),
            self._tensor([r.key for r in requests]),
            self._tensor([len(h.tokens) for h in batch]), min_p, top_k)
        chosen = next_tokens.tolist()
        scores = token_logprobs(logits, next_tokens).tolist() if any(r.logprobs for r in requests) \
            else [0.0] * len(batch)
        tops = self._top_logprobs(logits, requests)
        now = time.perf_counter()
        for handle, token, logprob, top in zip(batch, chosen, scores, tops):
            self._record(handle, token, logprob, top, events, now)

    def _record(self, handle: Handle, token: int, logprob: float, top: Optional[List[Tuple[int, float]]],
                events: List[Event], now: float) -> bool:
        """A token the request's row chose: recorded, or it ends the request (a stop token, its
        stop check, its budget). Returns whether the request goes on."""
        self.stats.generated += 1
        logprob = logprob if handle.request.logprobs else 0.0
        if handle.first_token_at is None:
            handle.first_token_at = now
        if token in handle._stops:
            # Reported with the event, never recorded (echo scoring reads the position).
            self._finish(handle, "stop", events, logprob=logprob, top=top, stop_token=token)
            return False
        handle.tokens.append(token)
        handle.logprobs.append(logprob)
        if handle._controls is not None:
            handle._controls.add(token)
        if handle._stop_check is not None and handle._stop_check(token):
            self._finish(handle, "stop", events, token, logprob, top)
        elif len(handle.tokens) >= handle.budget:
            self._finish(handle, "length", events, token, logprob, top)
        else:
            events.append(Event(handle, token, logprob, top=top))
            return True
        return False

    def _controlled(self, batch: List[Handle], logits: torch.Tensor) -> Tuple[
            torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """What sample() needs for the rows' controls: (the logits to sample from, min_p and top_k
        per row or None). Rows without controls cost nothing more: with none in the batch this is
        (logits, None, None); otherwise only the rows with logit_bias or penalties are adjusted,
        each alone (its own bias and token counts), in a float32 copy (logprobs stay the raw
        logits')."""
        if not any(h.controlled for h in batch):  # the common case: one attribute read per row
            return logits, None, None
        controls = [h.request.controls for h in batch]
        sampled = logits
        for i, (handle, c) in enumerate(zip(batch, controls)):
            if not c.adjusts_logits:
                continue
            if handle._controls is None:
                handle._controls = ControlState(c, handle.request.prompt_tokens, logits.shape[-1], self.device)
            if sampled is logits:
                sampled = logits.to(torch.float32, copy=True)
            handle._controls.adjust(sampled[i])
        if not any(c.cuts for c in controls):
            return sampled, None, None
        return (sampled, torch.tensor([c.min_p for c in controls], dtype=torch.float32, device=self.device),
                self._tensor([c.top_k for c in controls]))

    @staticmethod
    def _top_logprobs(logits: torch.Tensor, requests: List[Request]) -> List[Optional[List[Tuple[int, float]]]]:
        """Per row, its request's top_logprobs most likely (token, logprob), most likely first,
        or None where it asked for none; logits [N, V]."""
        most = max(r.top_logprobs for r in requests)
        if not most:
            return [None] * len(requests)
        values, ids = torch.log_softmax(logits.float(), dim=-1).topk(most, dim=-1)
        values, ids = values.tolist(), ids.tolist()
        return [list(zip(ids[i][: r.top_logprobs], values[i][: r.top_logprobs])) if r.top_logprobs else None
                for i, r in enumerate(requests)]


def _shared(prompt: Sequence[int], content: Sequence[int], limit: int) -> int:
    """How many leading tokens two sequences share, at most `limit`."""
    n = min(len(content), limit)
    if list(prompt[:n]) == list(content[:n]):  # the common case: all of it, at C speed
        return n
    return next(i for i in range(n) if prompt[i] != content[i])
