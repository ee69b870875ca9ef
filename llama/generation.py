"""Llama: prompt -> tokens -> prefill -> decode -> sample -> text, batched or streamed.
Signatures and return shapes follow Meta's reference code; building a Llama from a
checkpoint is llama.runtime.loading's (Llama.build is a thin wrapper over it), running
requests the engine's (llama.runtime.engine), tokens -> text the detokenizer's.

Beyond Meta's arguments, the generating calls take keyword-only sampling controls (top_k,
min_p, presence_penalty, frequency_penalty, repetition_penalty, logit_bias: see
llama.runtime.sampling) and stop strings (`stop`): a request ends as soon as its generated
text holds one (its row is freed at once, by the engine's stop check), and its text ends
before the first one (OpenAI's rule). Its tokens and logprobs then run up to and including
the token that completed the stop string (as HF's stop_strings and this package's server
give them), so they may hold more text than `generation`."""

import collections
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

import torch

from . import tool_calls
from .chat_format import ChatFormat, Dialog, Message, make_chat_format
from .detokenize import Detokenizer, token_texts
from .errors import LlamaError
from .infilling import infilling_prompt_tokens, infilling_tokens
from .model import Transformer
from .runtime.distributed import DistContext
from .runtime.engine import Engine, Handle, Request, check_prompt
from .runtime.loading import load
from .runtime.sampling import (SamplingControls, check_sampling, random_key, request_key,  # noqa: F401 - public
                               sample_top_p)
from .tokenizer import Tokenizer
from .utils.checks import check_text, whole_number
from .utils.measurements import first_use_seconds


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class InfillingPrediction(TypedDict, total=False):
    generation: str
    full_text: str  # prefix + generation + suffix
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


@dataclass
class GenerationStats:
    """Figures of the latest decode: what the CLIs print after each generation."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    first_use_s: float = 0.0  # one-time work on this machine (measurements, native build), within total_s
    first_use_after_first_token_s: float = 0.0  # the part of it after the first token
    tokens_per_draft: float = 0.0  # prompt lookup: tokens a drafting row gained per pass (0: no drafts)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed after the first token, one-time work left out."""
        decode_s = self.total_s - self.time_to_first_token_s - self.first_use_after_first_token_s
        return (self.generated_tokens - 1) / decode_s if self.generated_tokens > 1 and decode_s > 0 else 0.0

    def summary(self) -> str:
        line = (f"[{self.prompt_tokens} prompt tokens, {self.generated_tokens} generated, "
                f"{self.tokens_per_s:.1f} tokens/s, first token after {self.time_to_first_token_s * 1000:.0f} ms]")
        if self.tokens_per_draft:
            line = line[:-1] + f", {self.tokens_per_draft:.2f} tokens per drafted step]"
        if self.first_use_s >= 0.5:
            line += f" (with {self.first_use_s:.0f} s of first-use work on this machine, not repeated)"
        return line

    def count_drafts(self, before: Tuple[int, int], after: Tuple[int, int]) -> None:
        """Fills tokens_per_draft from the engine's (drafted_rows, draft_accepted) before and after."""
        rows, accepted = after[0] - before[0], after[1] - before[1]
        self.tokens_per_draft = (rows + accepted) / rows if rows else 0.0

    def fill_times(self, start: float, first_token_at: Optional[float]) -> None:
        """Fills the times of a generation that started at `start` (time.perf_counter())."""
        now = time.perf_counter()
        self.time_to_first_token_s = first_token_at - start if first_token_at is not None else 0.0
        self.total_s = now - start
        self.first_use_s = first_use_seconds(start, now)
        self.first_use_after_first_token_s = first_use_seconds(first_token_at, now) if first_token_at else 0.0


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: Optional[str] = None,
        max_seq_len: int = 512,
        max_batch_size: int = 4,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        quantize: Optional[str] = None,
        prefix_cache: bool = True,
        prompt_lookup_num_tokens: int = 0,
        draft_ckpt_dir: Optional[str] = None,
        num_assistant_tokens: int = 5,
        static_decode: Optional[bool] = None,
        gpu_memory_fraction: Optional[float] = None,
    ) -> "Llama":
        """Load a Meta-layout checkpoint onto this process's share of the model.

        Works under torchrun (one process per model-parallel rank) and as plain python
        (a world of one). The checkpoint may have any number of shards.

        Args:
            ckpt_dir: folder with consolidated.NN.pth shards and params.json.
            tokenizer_path: the model's tokenizer file; default: the one in ckpt_dir.
            max_seq_len: longest prompt + generation, in tokens.
            max_batch_size: most sequences decoded at once (more are processed in chunks).
            model_parallel_size: ranks the model is split over; default: the world size.
            seed: the same on every rank, so every rank samples the same tokens.
            device: override the automatic choice (accelerator, else MPS, else CPU).
            dtype: fp32, bf16 or fp16; default bf16/fp16 on accelerators, and on CPUs with
                native bf16 (fp32 on other CPUs).
            quantize: "int8", "q8_0", "q4_0" or "q4_1" for weight-only quantized projections
                (see llama.model.quantize), or None.
            prefix_cache: a prompt whose beginning is already in a cache row (an earlier turn of
                the chat, another request's system prompt) prefills only the rest (see
                llama.runtime.engine); the same tokens, logprobs within fp32 rounding.
            prompt_lookup_num_tokens: if > 0, requests draft up to this many tokens per step
                from their own prompt and answer (prompt-lookup speculative decoding, as HF's
                argument of that name) and keep, from one pass, the tokens they would have
                picked one at a time (greedy or sampled).
            draft_ckpt_dir: a smaller model with the same tokenizer (Meta's layout, loaded as this
                one is) whose greedy continuation, num_assistant_tokens tokens (HF's name), is
                the draft instead; it changes the speed only, never a token.
            static_decode: decode in fixed shapes with sampling on the device and no host read
                inside a step (llama.runtime.static_step), captured once per batch-size and
                context bucket as CUDA graphs; None (default): where CUDA graphs can capture it
                (one process per model on a CUDA GPU); True: everywhere (eagerly elsewhere).
            gpu_memory_fraction: size the KV cache to the device (vLLM's gpu_memory_utilization):
                once the weights are in, as many rows of max_seq_len tokens as fit in this
                fraction of the device's memory, beside what is in use and a forward pass's
                activations, up to max_batch_size (give a large one to fill the device); the
                choice is printed, and a LlamaError says so where not one row fits. On a machine
                without an accelerator, the fraction is of the machine's memory.
        """
        loaded = load(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                      model_parallel_size=model_parallel_size, seed=seed, device=device, dtype=dtype,
                      quantize=quantize, gpu_memory_fraction=gpu_memory_fraction)
        max_batch_size = loaded.model.params.max_batch_size  # the rows gpu_memory_fraction chose, if given
        draft = None
        if draft_ckpt_dir is not None:
            # The draft reads the model's tokenizer: a vocabulary it does not share is refused.
            try:
                draft = load(draft_ckpt_dir, tokenizer_path if tokenizer_path is not None else ckpt_dir,
                             max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                             model_parallel_size=model_parallel_size, seed=seed, device=device, dtype=dtype).model
            except LlamaError as exc:
                raise LlamaError(f"draft_ckpt_dir={draft_ckpt_dir!r}: {exc} (a draft model must share the "
                                 f"model's tokenizer)") from None
        return Llama(loaded.model, loaded.tokenizer, loaded.ctx, loaded.chat_format, prefix_cache=prefix_cache,
                     prompt_lookup_num_tokens=prompt_lookup_num_tokens, draft_model=draft,
                     num_assistant_tokens=num_assistant_tokens, static_decode=static_decode)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, ctx: Optional[DistContext] = None,
                 formatter: Optional[ChatFormat] = None, prefix_cache: bool = True,
                 prompt_lookup_num_tokens: int = 0, draft_model: Optional[Transformer] = None,
                 num_assistant_tokens: int = 5, static_decode: Optional[bool] = None):
        """formatter: the chat format; default: the one the tokenizer's vocabulary implies.
        prefix_cache, prompt_lookup_num_tokens, num_assistant_tokens, static_decode: see build(); draft_model:
        the model build() loads from draft_ckpt_dir."""
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = formatter if formatter is not None else make_chat_format(tokenizer)
        self.ctx = ctx
        self.last_stats = GenerationStats()
        # The scheduler over the KV cache's rows; every generation runs through it. The lock
        # serialises its steps: calls from several threads share its batch.
        self.engine = Engine(model, prefix_cache=prefix_cache, prompt_lookup_num_tokens=prompt_lookup_num_tokens,
                             draft_model=draft_model, num_assistant_tokens=num_assistant_tokens,
                             static_decode=static_decode)
        self._lock = threading.RLock()
        self._drivers: Dict[int, int] = collections.Counter()  # thread id -> calls in flight

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    # ---- the decode loop: requests through the engine ---------------------------------------

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int,
                       temperature: float, top_p: float) -> None:
        params = self.model.params
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise LlamaError("no prompts given: pass a non-empty list")
        check_sampling(temperature, top_p, max_gen_len)
        for i, tokens in enumerate(prompt_tokens):
            check_prompt(tokens, params.max_seq_len, params.vocab_size, f"prompt {i}")

    def _keys(self, count: int, temperature: float, seed: Optional[int]) -> List[int]:
        """One sampling key per prompt, from its position and the call's key: `seed` if given,
        else drawn from the global torch RNG (so torch.manual_seed before a call reproduces it,
        and successive calls sample afresh). Greedy calls draw nothing, as in Meta's code."""
        seed = whole_number(seed, "seed", optional=True)
        call = seed if seed is not None else random_key() if temperature > 0 else 0
        return [request_key(call, i) for i in range(count)]

    def _requests(self, prompt_tokens: Sequence[Sequence[int]], keys: List[int], max_gen_len: int,
                  temperature: float, top_p: float, logprobs: bool, stop_tokens: Optional[Sequence[int]],
                  echo: bool = False, controls: SamplingControls = SamplingControls()) -> List[Request]:
        stops = tuple(stop_tokens if stop_tokens is not None else self.tokenizer.stop_tokens)
        temperature, top_p, max_gen_len = check_sampling(temperature, top_p, max_gen_len)
        return [Request(list(t), max_gen_len, temperature, top_p, key, stops, logprobs, echo and logprobs,
                        controls=controls) for t, key in zip(prompt_tokens, keys)]

    def _controls(self, top_k: Any, min_p: Any, presence_penalty: Any, frequency_penalty: Any,
                  repetition_penalty: Any, logit_bias: Any) -> SamplingControls:
        return SamplingControls.checked(top_k, min_p, presence_penalty, frequency_penalty, repetition_penalty,
                                        logit_bias, vocab_size=self.model.params.vocab_size)

    @contextlib.contextmanager
    def _driving(self) -> Iterator[None]:
        """Mark a call in flight from this thread. Calls from several threads share the engine
        (each step advances all of them); under model parallelism that would let the ranks run
        different steps, so there a second thread is refused."""
        me = threading.get_ident()
        with self._lock:
            others = [t for t in self._drivers if t != me]
            if others and self.ctx is not None and self.ctx.model_parallel_size > 1:
                raise LlamaError(f"this Llama is already generating in another thread; under model "
                                 f"parallelism ({self.ctx.model_parallel_size} ranks) every rank must run "
                                 f"the same steps, so drive it from one thread at a time")
            self._drivers[me] += 1
        try:
            yield
        finally:
            with self._lock:
                self._drivers[me] -= 1
                if not self._drivers[me]:
                    del self._drivers[me]

    def _submit(self, requests: List[Request], stops: Optional[Sequence[Sequence[str]]] = None) -> List[Handle]:
        stops = stops if stops is not None else [()] * len(requests)
        with self._lock:
            return [self.engine.submit(r, f"prompt {i}", stop_check(self.tokenizer, s))
                    for i, (r, s) in enumerate(zip(requests, stops))]

    def _advance(self, handles: List[Handle]) -> None:
        """One engine step unless every handle is done (another thread may have stepped)."""
        with self._lock:
            if not all(h.done for h in handles):
                self.engine.step()

    def _cancel(self, handles: List[Handle]) -> None:
        with self._lock:
            for h in handles:
                self.engine.cancel(h)

    def stream_tokens(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, temperature: float = 0.6,
                      top_p: float = 0.9, logprobs: bool = False, stop_tokens: Optional[Sequence[int]] = None,
                      seed: Optional[int] = None, *, stop: Optional[Sequence[str]] = None, top_k: int = 0,
                      min_p: float = 0.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                      repetition_penalty: float = 1.0, logit_bias: Optional[Dict[int, float]] = None,
                      ) -> Iterator[List[Optional[Tuple[int, float]]]]:
        """Decode at most max_batch_size prompts, yielding as tokens arrive.

        Each yield holds, per prompt, (token, logprob) for its next token or None where that
        prompt has no new token (finished, or still waiting for a row). Stop tokens are not
        yielded; the token that completes a stop string is, and is that prompt's last; logprob
        is 0.0 unless logprobs=True. Tokens are those generate() gives for the same arguments
        and random state. The arguments are checked now, as generate() checks them, not at the
        first step. Closing the iterator early cancels what is left.
        """
        self._check_prompts(prompt_tokens, max_gen_len, temperature, top_p)
        if len(prompt_tokens) > self.model.params.max_batch_size:
            raise LlamaError(f"stream_tokens decodes at most max_batch_size={self.model.params.max_batch_size} "
                             f"prompts at once, got {len(prompt_tokens)}; generate() takes any number")
        controls = self._controls(top_k, min_p, presence_penalty, frequency_penalty, repetition_penalty, logit_bias)
        stops = check_stops(stop)
        keys = self._keys(len(prompt_tokens), temperature, seed)
        return self._stream(self._requests(prompt_tokens, keys, max_gen_len, temperature, top_p, logprobs,
                                           stop_tokens, controls=controls), [stops] * len(prompt_tokens))

    def _stream(self, requests: List[Request],
                stops: Sequence[Sequence[str]]) -> Iterator[List[Optional[Tuple[int, float]]]]:
        with self._driving():
            start = time.perf_counter()
            stats = self.last_stats = GenerationStats(prompt_tokens=sum(len(r.prompt_tokens) for r in requests))
            drafts = self._draft_counts()
            handles = self._submit(requests, stops)
            sent, first = [0] * len(handles), None
            try:
                while True:
                    out: List[Optional[Tuple[int, float]]] = [None] * len(handles)
                    for i, h in enumerate(handles):
                        if sent[i] < len(h.tokens):
                            out[i] = (h.tokens[sent[i]], h.logprobs[sent[i]])
                            sent[i] += 1
                    if any(item is not None for item in out):
                        first = first or time.perf_counter()
                        stats.generated_tokens += sum(item is not None for item in out)
                        stats.fill_times(start, first)
                        stats.count_drafts(drafts, self._draft_counts())
                        yield out
                    elif all(h.done for h in handles):
                        _raise_errors(handles)
                        return
                    else:
                        self._advance(handles)
            finally:
                self._cancel(handles)

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        stop_tokens: Optional[Sequence[int]] = None,
        seed: Optional[int] = None,
        *,
        stop: Optional[Sequence[str]] = None,
        top_k: int = 0,
        min_p: float = 0.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logit_bias: Optional[Dict[int, float]] = None,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Generate continuations of token prompts.

        Any number of prompts, continuously batched (a finished row takes the next prompt at
        once); results in order. Returns (tokens per prompt, logprobs per prompt or None).
        With echo, the prompt tokens lead each result (their logprobs, if asked, score each
        prompt token given the ones before it; the first is 0.0). stop_tokens default to the
        tokenizer's. Prompt i samples with a key made from i and the call's key (`seed`, else
        drawn from the global torch RNG), so its result does not depend on the other prompts.
        stop: strings (or one string) that end a prompt's generation as soon as its text holds
        one, the token that completed it included. top_k, min_p, presence_penalty,
        frequency_penalty, repetition_penalty, logit_bias: the sampling controls
        (llama.runtime.sampling; off by default); logprobs stay the raw model's.
        """
        self._check_prompts(prompt_tokens, max_gen_len, temperature, top_p)
        controls = self._controls(top_k, min_p, presence_penalty, frequency_penalty, repetition_penalty, logit_bias)
        stops = check_stops(stop)
        keys = self._keys(len(prompt_tokens), temperature, seed)
        requests = self._requests(prompt_tokens, keys, max_gen_len, temperature, top_p, logprobs,
                                  stop_tokens, echo, controls)
        handles = self._run(requests, [stops] * len(requests))
        tokens = [list(r.prompt_tokens) + h.tokens if echo else h.tokens for r, h in zip(requests, handles)]
        if not logprobs:
            return tokens, None
        return tokens, [(h.prompt_logprobs or []) + h.logprobs if echo else h.logprobs for h in handles]

    def complete(self, requests: Sequence[Request],
                 stops: Optional[Sequence[Sequence[str]]] = None) -> Iterator[Tuple[int, Handle]]:
        """Submit requests to the engine and step it, yielding (index in `requests`, handle) as
        each request finishes, in the order they finish. Closing the iterator early cancels
        the rest. last_stats covers these requests once all are done. stops: per request, its
        stop strings (generated_text gives the text they end)."""
        with self._driving():
            start = time.perf_counter()
            handles = self._submit(list(requests), stops)
            waiting = list(enumerate(handles))
            drafts = self._draft_counts()
            try:
                while waiting:
                    finished = [(i, h) for i, h in waiting if h.done]
                    if not finished:
                        self._advance([h for _, h in waiting])
                        continue
                    _raise_errors([h for _, h in finished])
                    waiting = [(i, h) for i, h in waiting if not h.done]
                    yield from finished
            finally:
                self._cancel(handles)
            firsts = [h.first_token_at for h in handles if h.first_token_at is not None]
            self.last_stats = GenerationStats(prompt_tokens=sum(len(r.prompt_tokens) for r in requests),
                                              generated_tokens=sum(len(h.tokens) for h in handles))
            self.last_stats.fill_times(start, min(firsts) if firsts else None)
            self.last_stats.count_drafts(drafts, self._draft_counts())

    def _draft_counts(self) -> Tuple[int, int]:
        return self.engine.stats.drafted_rows, self.engine.stats.draft_accepted

    def _run(self, requests: List[Request], stops: Optional[Sequence[Sequence[str]]] = None) -> List[Handle]:
        """complete(), the handles in the order of the requests."""
        handles: List[Optional[Handle]] = [None] * len(requests)
        for i, handle in self.complete(requests, stops):
            handles[i] = handle
        return handles  # type: ignore[return-value]

    # ---- text in, text out -------------------------------------------------------------

    def stream_completion(self, prompt: str, temperature: float = 0.6, top_p: float = 0.9,
                          max_gen_len: Optional[int] = None, *, stop: Optional[Sequence[str]] = None,
                          top_k: int = 0, min_p: float = 0.0, presence_penalty: float = 0.0,
                          frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
                          logit_bias: Optional[Dict[int, float]] = None) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces while it is decoded.

        The pieces join to text_completion's `generation` for the same arguments and random
        state (stop strings and sampling controls: see generate). Under model parallelism
        every rank must iterate; all ranks yield the same text.
        """
        if not isinstance(prompt, str):
            raise LlamaError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r:.80}")
        tokens = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False)
        controls = dict(top_k=top_k, min_p=min_p, presence_penalty=presence_penalty,
                        frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                        logit_bias=logit_bias)
        return self._stream_text(tokens, temperature, top_p, max_gen_len, self.tokenizer.stop_tokens, stop, controls)

    def stream_chat(self, dialog: Dialog, temperature: float = 0.6, top_p: float = 0.9,
                    max_gen_len: Optional[int] = None, *, stop: Optional[Sequence[str]] = None,
                    top_k: int = 0, min_p: float = 0.0, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
                    logit_bias: Optional[Dict[int, float]] = None) -> Iterator[str]:
        """Yield the assistant's answer to one dialog as text pieces (see stream_completion)."""
        self.formatter.check_dialog(dialog)
        controls = dict(top_k=top_k, min_p=min_p, presence_penalty=presence_penalty,
                        frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                        logit_bias=logit_bias)
        if self.formatter.is_unsafe(dialog):
            self._controls(**controls)  # bad arguments are refused all the same
            check_stops(stop)
            return iter([self.formatter.UNSAFE_ERROR])
        tokens = self.formatter.encode_dialog_prompt(dialog)
        return self._stream_text(tokens, temperature, top_p, max_gen_len, self.formatter.stop_tokens, stop, controls)

    def _stream_text(self, prompt_tokens: List[int], temperature: float, top_p: float,
                     max_gen_len: Optional[int], stop_tokens: Sequence[int], stop: Optional[Sequence[str]],
                     controls: Dict[str, Any]) -> Iterator[str]:
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        stops = check_stops(stop)
        steps = self.stream_tokens([prompt_tokens], max_gen_len, temperature, top_p, stop_tokens=stop_tokens,
                                   stop=stops, **controls)

        def pieces() -> Iterator[str]:
            text = Detokenizer(self.tokenizer, stops=stops)
            for step in steps:
                text.add(step[0][0])
                piece = text.take()
                if piece:
                    yield piece
            rest = text.finish()
            if rest:
                yield rest

        return pieces()

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        seed: Optional[int] = None,
        *,
        stop: Optional[Sequence[str]] = None,
        top_k: int = 0,
        min_p: float = 0.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logit_bias: Optional[Dict[int, float]] = None,
        n: Optional[int] = None,
    ) -> List[CompletionPrediction]:
        """Complete each text prompt. max_gen_len defaults to max_seq_len - 1; seed, stop and
        the sampling controls: see generate. `generation` ends before the first stop string.
        n: that many samples of each prompt, prefilled once (see _samples); the result is then
        one list of n predictions per prompt."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise LlamaError("prompts must be a non-empty list of strings")
        if n is not None:
            return _samples(prompts, n, lambda many: self.text_completion(
                many, temperature, top_p, max_gen_len, logprobs, echo, seed, stop=stop, top_k=top_k, min_p=min_p,
                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                repetition_penalty=repetition_penalty, logit_bias=logit_bias))
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise LlamaError(f"prompt {i} must be a str, got {type(p).__name__}: {p!r:.80}")
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=self.tokenizer.add_bos, eos=False) for x in prompts]
        stops = check_stops(stop)
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, seed=seed,
                                    stop=stops, top_k=top_k, min_p=min_p, presence_penalty=presence_penalty,
                                    frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                                    logit_bias=logit_bias)
        results = []
        for i, (prompt, t) in enumerate(zip(prompt_tokens, tokens)):
            before = prompt if echo else []
            text = generated_text(self.tokenizer, t[len(before):], stops, before)
            results.append(self._prediction(text, t, lps[i] if lps else None))
        return results

    def text_infilling(
        self,
        prefixes: List[str],
        suffixes: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        suffix_first: bool = False,
    ) -> List[InfillingPrediction]:
        """Fill the gap between each prefix and its suffix (Code Llama 7B and 13B), as Meta's
        codellama: the prompt layouts of llama.infilling (SPM with suffix_first), generation
        up to ▁<EOT>; `full_text` is prefix + generation + suffix, and with logprobs, `tokens`
        are the vocabulary's pieces. max_gen_len defaults to max_seq_len - 1."""
        _check_texts(prefixes, "prefixes")
        _check_texts(suffixes, "suffixes")
        if len(prefixes) != len(suffixes):
            raise LlamaError(f"text_infilling got {len(prefixes)} prefixes but {len(suffixes)} suffixes; "
                             f"give one suffix per prefix")
        eot = infilling_tokens(self.tokenizer).eot
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [infilling_prompt_tokens(self.tokenizer, p, s, suffix_first) for p, s in zip(prefixes, suffixes)]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, stop_tokens=[eot])
        results: List[InfillingPrediction] = []
        for i, (prefix, suffix, t) in enumerate(zip(prefixes, suffixes, tokens)):
            generation = self.tokenizer.decode_infilling(t)
            result: InfillingPrediction = {"generation": generation, "full_text": prefix + generation + suffix}
            if lps is not None:
                result.update(tokens=[self.tokenizer.token_piece(x) for x in t], logprobs=lps[i])
            results.append(result)
        return results

    def chat_completion(self, dialogs: List[Dialog], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False,
                        seed: Optional[int] = None, *, stop: Optional[Sequence[str]] = None, top_k: int = 0,
                        min_p: float = 0.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                        repetition_penalty: float = 1.0, logit_bias: Optional[Dict[int, float]] = None,
                        tools: Optional[List[Dict[str, Any]]] = None,
                        tool_choice: Optional[tool_calls.ToolChoice] = None,
                        n: Optional[int] = None) -> List[ChatPrediction]:
        """Answer each dialog as the assistant. Dialogs holding the chat format's control
        tags are not run; their answer is the format's error message, as in Meta's code.
        Dialog i samples with the key of input position i (seed, stop and the sampling
        controls: see generate; the answer's text ends before the first stop string).

        tools (Llama 3.1 models): functions in OpenAI's shape, offered in Meta's JSON tool
        format; an answer that calls one has content "" and "tool_calls": [{"call_id",
        "tool_name", "arguments"}] (llama-models' ToolCall). tool_choice: "auto" (default with
        tools), "none", "required" or {"type": "function", "function": {"name": NAME}}; see
        llama.tool_calls. Dialogs may hold such calls (assistant messages) and their results
        (role "tool"). n: as text_completion's."""
        if not isinstance(dialogs, (list, tuple)) or not dialogs:
            raise LlamaError("dialogs must be a non-empty list of dialogs")
        if n is not None:
            return _samples(dialogs, n, lambda many: self.chat_completion(
                many, temperature, top_p, max_gen_len, logprobs, seed, stop=stop, top_k=top_k, min_p=min_p,
                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                repetition_penalty=repetition_penalty, logit_bias=logit_bias, tools=tools, tool_choice=tool_choice))
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        tools = tool_calls.check_tools(tools) if tools is not None else None
        choice = tool_calls.check_tool_choice(("auto" if tools else "none") if tool_choice is None else tool_choice,
                                              tools)
        for i, dialog in enumerate(dialogs):
            self.formatter.check_dialog(dialog, i)
        unsafe = [self.formatter.is_unsafe(d) for d in dialogs]
        safe = [i for i, bad in enumerate(unsafe) if not bad]
        prompts = [self.formatter.encode_dialog_prompt(dialogs[i], tools, choice) for i in safe]
        check_sampling(temperature, top_p, max_gen_len)
        controls = self._controls(top_k, min_p, presence_penalty, frequency_penalty, repetition_penalty, logit_bias)
        stops = check_stops(stop)
        params = self.model.params
        for i, tokens in zip(safe, prompts):
            check_prompt(tokens, params.max_seq_len, params.vocab_size, f"dialog {i}")
        keys = self._keys(len(dialogs), temperature, seed)
        requests = self._requests(prompts, [keys[i] for i in safe], max_gen_len, temperature, top_p, logprobs,
                                  self.formatter.stop_tokens, controls=controls)
        handles = self._run(requests, [stops] * len(requests)) if prompts else []
        answers = dict(zip(safe, handles))

        results: List[ChatPrediction] = []
        for i in range(len(dialogs)):
            if i not in answers:
                content, t, lp = self.formatter.UNSAFE_ERROR, [], [] if logprobs else None
            else:
                h = answers[i]
                content = generated_text(self.tokenizer, h.tokens, stops)
                t, lp = h.tokens, h.logprobs if logprobs else None
            pred = self._prediction(content, t, lp)
            message: Message = {"role": "assistant", "content": content}
            if tools and choice != "none" and i in answers:
                message = _tool_answer(content, tools, choice)
            results.append({**pred, "generation": message})
        return results

    def _prediction(self, text: str, tokens: List[int], logprobs: Optional[List[float]]) -> dict:
        if logprobs is None:
            return {"generation": text}
        return {"generation": text, "tokens": token_texts(self.tokenizer, tokens), "logprobs": logprobs}


MAX_SAMPLES = 128  # n per prompt: each sample is a request of its own


def _samples(inputs: Sequence[Any], n: Any, call: Callable[[List[Any]], List[Any]]) -> List[List[Any]]:
    """n samples of each input: call() on every input repeated n times, in order, regrouped.
    Sample j of input i is what the call gives at position i * n + j: its own sampling key (as
    the server's choice i * n + j with the same seed), and one prefill serves all n (the
    engine's prefix cache: copies of a prompt admitted together wait for its first prefill)."""
    n = whole_number(n, "n", low=1, high=MAX_SAMPLES)
    flat = call([item for item in inputs for _ in range(n)])
    return [flat[i * n: (i + 1) * n] for i in range(len(inputs))]


def _tool_answer(content: str, tools: List[Dict[str, Any]], choice: tool_calls.ToolChoice) -> Message:
    """The assistant's message when tools were offered: a call of one of them, or the text
    (with the start of a call the prompt gave it, when a forced call did not come out whole)."""
    prefix = tool_calls.call_prefix(choice)
    call = tool_calls.parse_tool_call(prefix + content)
    if call is not None and call["tool_name"] in {t["function"]["name"] for t in tools}:
        return {"role": "assistant", "content": "", "tool_calls": [call]}
    return {"role": "assistant", "content": prefix + content}


def check_stops(stop: Any, where: str = "") -> Tuple[str, ...]:
    """Stop strings: None, a string or a list of strings -> a tuple (empty strings, which
    never match, dropped); a LlamaError naming `stop` otherwise."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)):
        raise LlamaError(f"{where}stop={stop!r:.80} must be a string or a list of strings")
    for i, text in enumerate(items):
        check_text(text, f"{where}stop[{i}]")
    return tuple(text for text in items if text)


def stop_check(tokenizer: Tokenizer, stops: Sequence[str]) -> Optional[Callable[[int], bool]]:
    """The engine's stop check for stop strings (None without any): fed each generated token,
    True once the text of the tokens so far holds a stop string (the detokenizer's rule)."""
    if not stops:
        return None
    text = Detokenizer(tokenizer, stops=stops)

    def stopped(token: int) -> bool:
        text.add(token)
        text.take()
        return text.stopped

    return stopped


def generated_text(tokenizer: Tokenizer, tokens: Sequence[int], stops: Sequence[str] = (),
                   before: Sequence[int] = ()) -> str:
    """The text of generated `tokens`, ended before the first stop string in it (the text the
    stop check saw); with `before` (echo: the prompt), the text of before + tokens, its end
    cut as much."""
    text = tokenizer.decode(list(before) + list(tokens))
    if not stops:
        return text
    alone = Detokenizer(tokenizer, stops=stops)
    for token in tokens:
        alone.add(token)
    kept = alone.finish()
    if not alone.stopped:
        return text
    return text[: len(text) - (len(tokenizer.decode(list(tokens))) - len(kept))]


def _check_texts(texts: Any, name: str) -> None:
    """LlamaError unless `texts` (the argument `name`) is a non-empty list of valid text."""
    if not isinstance(texts, (list, tuple)) or not texts:
        raise LlamaError(f"{name} must be a non-empty list of strings, got {texts!r:.80}")
    for i, text in enumerate(texts):
        check_text(text, f"{name}[{i}]")


def _raise_errors(handles: List[Handle]) -> None:
    """Raise the first error a request met (NaN logits, or a step that failed)."""
    for h in handles:
        if h.error is not None:
            raise h.error
