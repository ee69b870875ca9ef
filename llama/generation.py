"""Llama: prompt -> tokens -> prefill -> decode -> sample -> text, batched or streamed.
Signatures and return shapes follow Meta's reference code; building a Llama from a
checkpoint is llama.loading's (Llama.build is a thin wrapper over it)."""

import time
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

import torch

from . import kernels
from .chat_format import ChatFormat, Dialog, Message, check_dialog, make_chat_format
from .distributed import DistContext
from .errors import LlamaError
from .loading import load
from .model import Transformer
from .tokenizer import Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
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

    @property
    def tokens_per_s(self) -> float:
        """Decode speed after the first token."""
        decode_s = self.total_s - self.time_to_first_token_s
        return (self.generated_tokens - 1) / decode_s if self.generated_tokens > 1 and decode_s > 0 else 0.0

    def summary(self) -> str:
        return (f"[{self.prompt_tokens} prompt tokens, {self.generated_tokens} generated, "
                f"{self.tokens_per_s:.1f} tokens/s, first token after {self.time_to_first_token_s * 1000:.0f} ms]")


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
            quantize: "int8" for weight-only int8 projections (see llama.quantize), or None.
        """
        loaded = load(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, model_parallel_size, seed,
                      device, dtype, quantize)
        return Llama(loaded.model, loaded.tokenizer, loaded.ctx, loaded.chat_format)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, ctx: Optional[DistContext] = None,
                 formatter: Optional[ChatFormat] = None):
        """formatter: the chat format; default: the one the tokenizer's vocabulary implies."""
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = formatter if formatter is not None else make_chat_format(tokenizer)
        self.ctx = ctx
        self.last_stats = GenerationStats()

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    # ---- the decode loop -------------------------------------------------------------

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int,
                       temperature: float, top_p: float) -> None:
        params = self.model.params
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise LlamaError("no prompts given: pass a non-empty list")
        check_sampling(temperature, top_p, max_gen_len)
        for i, tokens in enumerate(prompt_tokens):
            if len(tokens) == 0:
                raise LlamaError(f"prompt {i} is empty; give at least one token")
            if len(tokens) >= params.max_seq_len:
                raise LlamaError(f"prompt {i} has {len(tokens)} tokens, {len(tokens) - params.max_seq_len + 1} "
                                 f"too many for max_seq_len={params.max_seq_len} (which must also leave "
                                 f"room for one generated token); shorten it or build with a larger max_seq_len")
            bad = [t for t in tokens if not (isinstance(t, int) and 0 <= t < params.vocab_size)]
            if bad:
                raise LlamaError(f"prompt {i} holds token ids outside [0, {params.vocab_size}): {bad[:5]}")

    def stream_tokens(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, temperature: float = 0.6,
                      top_p: float = 0.9, logprobs: bool = False, stop_tokens: Optional[Sequence[int]] = None,
                      ) -> Iterator[List[Optional[Tuple[int, float]]]]:
        """Decode one batch (at most max_batch_size prompts), a step at a time.

        Each step yields, per prompt, (token, logprob) or None once that prompt has
        finished (stop token or budget). Stop tokens are not yielded. logprob is 0.0
        unless logprobs=True. The whole prompt is prefilled in one forward pass; each
        row keeps its own positions, so ragged prompts decode exactly as they would alone.
        The arguments are checked now, as generate() checks them, not at the first step.
        """
        self._check_prompts(prompt_tokens, max_gen_len, temperature, top_p)
        if len(prompt_tokens) > self.model.params.max_batch_size:
            raise LlamaError(f"stream_tokens decodes at most max_batch_size={self.model.params.max_batch_size} "
                             f"prompts at once, got {len(prompt_tokens)}; generate() takes any number")
        return self._decode(prompt_tokens, max_gen_len, temperature, top_p, logprobs, stop_tokens)

    def _forward(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0,
                 **kwargs: Any) -> torch.Tensor:
        """The model on tokens [B, S], with the matmul kernels chosen for that shape."""
        with kernels.matmul_policy(tokens):
            return self.model(tokens, start_pos, **kwargs)

    @torch.inference_mode()
    def _decode(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, temperature: float,
                top_p: float, logprobs: bool,
                stop_tokens: Optional[Sequence[int]]) -> Iterator[List[Optional[Tuple[int, float]]]]:
        """stream_tokens' loop, for checked arguments."""
        params = self.model.params
        batch = len(prompt_tokens)
        stats = self.last_stats = GenerationStats(prompt_tokens=sum(len(t) for t in prompt_tokens))
        start = time.perf_counter()
        stops = torch.tensor(sorted(stop_tokens if stop_tokens is not None else self.tokenizer.stop_tokens),
                             device=self.device)
        lengths = [len(t) for t in prompt_tokens]
        # Each row may grow to max_seq_len; a row's budget is what it can still generate.
        budgets = [min(max_gen_len, params.max_seq_len - n) for n in lengths]
        longest = max(lengths)

        pad = 0
        tokens = torch.full((batch, longest), pad, dtype=torch.long, device=self.device)
        for row, t in enumerate(prompt_tokens):
            tokens[row, : len(t)] = torch.tensor(t, dtype=torch.long, device=self.device)
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self._forward(tokens, 0, last_index=last)  # [B, V]

        positions = last + 1  # where each row's next token goes
        live = [True] * batch
        steps = max(budgets)
        for step in range(steps):
            _check_finite(logits, self.model.norm.weight.dtype)
            next_tokens = _sample(logits, temperature, top_p)
            token_logprobs = _token_logprobs(logits, next_tokens).tolist() if logprobs else [0.0] * batch
            is_stop = torch.isin(next_tokens, stops)
            out: List[Optional[Tuple[int, float]]] = []
            for row, (tok, lp, stop) in enumerate(zip(next_tokens.tolist(), token_logprobs, is_stop.tolist())):
                live[row] = live[row] and not stop and step < budgets[row]
                out.append((tok, lp) if live[row] else None)
            if not any(live):
                return
            if step == 0:
                stats.time_to_first_token_s = time.perf_counter() - start
            stats.generated_tokens += sum(item is not None for item in out)
            stats.total_s = time.perf_counter() - start
            yield out
            if step + 1 == steps:
                return
            # Finished rows keep decoding (cheaply, in the batch) at a clamped position.
            feed_positions = positions.clamp(max=params.max_seq_len - 1)
            kv_len = min(longest + step + 1, params.max_seq_len)
            logits = self._forward(next_tokens.unsqueeze(1), feed_positions, kv_len=kv_len)[:, -1]
            positions = positions + 1

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
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Generate continuations of token prompts.

        Any number of prompts: they run in chunks of max_batch_size, results in order.
        Returns (tokens per prompt, logprobs per prompt or None). With echo, the prompt
        tokens lead each result (their logprobs, if asked, score each prompt token given
        the ones before it; the first is 0.0). stop_tokens default to the tokenizer's.
        """
        self._check_prompts(prompt_tokens, max_gen_len, temperature, top_p)
        prompt_tokens = [list(t) for t in prompt_tokens]
        out_tokens: List[List[int]] = []
        out_logprobs: List[List[float]] = []
        size = self.model.params.max_batch_size
        for begin in range(0, len(prompt_tokens), size):
            chunk = prompt_tokens[begin: begin + size]
            gen_tokens: List[List[int]] = [[] for _ in chunk]
            gen_logprobs: List[List[float]] = [[] for _ in chunk]
            for step in self._decode(chunk, max_gen_len, temperature, top_p, logprobs, stop_tokens):
                for row, item in enumerate(step):
                    if item is not None:
                        gen_tokens[row].append(item[0])
                        gen_logprobs[row].append(item[1])
            if echo:
                prompt_lps = self._prompt_logprobs(chunk) if logprobs else [[0.0] * len(t) for t in chunk]
                gen_tokens = [p + g for p, g in zip(chunk, gen_tokens)]
                gen_logprobs = [p + g for p, g in zip(prompt_lps, gen_logprobs)]
            out_tokens += gen_tokens
            out_logprobs += gen_logprobs
        return out_tokens, (out_logprobs if logprobs else None)

    def _prompt_logprobs(self, prompt_tokens: List[List[int]]) -> List[List[float]]:
        """Log-probability of each prompt token given those before it (first: 0.0)."""
        result = []
        for t in prompt_tokens:
            tokens = torch.tensor([t], dtype=torch.long, device=self.device)
            logits = self._forward(tokens, 0)[0, :-1]  # [S-1, V]
            lps = _token_logprobs(logits, tokens[0, 1:])
            result.append([0.0] + lps.tolist())
        return result

    # ---- text in, text out -------------------------------------------------------------

    def stream_completion(self, prompt: str, temperature: float = 0.6, top_p: float = 0.9,
                          max_gen_len: Optional[int] = None) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces while it is decoded.

        The pieces join to text_completion's `generation` for the same arguments and random
        state. Under model parallelism every rank must iterate; all ranks yield the same text.
        """
        if not isinstance(prompt, str):
            raise LlamaError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r:.80}")
        tokens = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False)
        return self._stream_text(tokens, temperature, top_p, max_gen_len, self.tokenizer.stop_tokens)

    def stream_chat(self, dialog: Dialog, temperature: float = 0.6, top_p: float = 0.9,
                    max_gen_len: Optional[int] = None) -> Iterator[str]:
        """Yield the assistant's answer to one dialog as text pieces (see stream_completion)."""
        check_dialog(dialog)
        if self.formatter.is_unsafe(dialog):
            return iter([self.formatter.UNSAFE_ERROR])
        tokens = self.formatter.encode_dialog_prompt(dialog)
        return self._stream_text(tokens, temperature, top_p, max_gen_len, self.formatter.stop_tokens)

    def _stream_text(self, prompt_tokens: List[int], temperature: float, top_p: float,
                     max_gen_len: Optional[int], stop_tokens: Sequence[int]) -> Iterator[str]:
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        steps = self.stream_tokens([prompt_tokens], max_gen_len, temperature, top_p, stop_tokens=stop_tokens)

        def pieces() -> Iterator[str]:
            generated: List[int] = []
            emitted = ""
            for step in steps:
                generated.append(step[0][0])
                # Decode the whole answer each time (detokenizers are context-sensitive) and
                # hold back a trailing incomplete multi-byte character.
                text = self.tokenizer.decode(generated).rstrip("\ufffd")
                if len(text) > len(emitted) and text.startswith(emitted):
                    yield text[len(emitted):]
                    emitted = text
            final = self.tokenizer.decode(generated)
            if final != emitted:
                yield final[len(emitted):]

        return pieces()

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> List[CompletionPrediction]:
        """Complete each text prompt. max_gen_len defaults to max_seq_len - 1."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise LlamaError("prompts must be a non-empty list of strings")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise LlamaError(f"prompt {i} must be a str, got {type(p).__name__}: {p!r:.80}")
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=self.tokenizer.add_bos, eos=False) for x in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        return [self._prediction(self.tokenizer.decode(t), t, lps[i] if lps else None)
                for i, t in enumerate(tokens)]

    def chat_completion(self, dialogs: List[Dialog], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False) -> List[ChatPrediction]:
        """Answer each dialog as the assistant. Dialogs holding the chat format's control
        tags are not run; their answer is the format's error message, as in Meta's code."""
        if not isinstance(dialogs, (list, tuple)) or not dialogs:
            raise LlamaError("dialogs must be a non-empty list of dialogs")
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        for i, dialog in enumerate(dialogs):
            check_dialog(dialog, i)
        unsafe = [self.formatter.is_unsafe(d) for d in dialogs]
        safe_prompts = [self.formatter.encode_dialog_prompt(d) for d, bad in zip(dialogs, unsafe) if not bad]
        tokens, lps = self.generate(safe_prompts, max_gen_len, temperature, top_p, logprobs,
                                    stop_tokens=self.formatter.stop_tokens) if safe_prompts else ([], None)

        results: List[ChatPrediction] = []
        answers = iter(range(len(tokens)))
        for bad in unsafe:
            if bad:
                content, t, lp = self.formatter.UNSAFE_ERROR, [], [] if logprobs else None
            else:
                i = next(answers)
                content, t, lp = self.tokenizer.decode(tokens[i]), tokens[i], lps[i] if lps else None
            pred = self._prediction(content, t, lp)
            results.append({**pred, "generation": {"role": "assistant", "content": content}})
        return results

    def _prediction(self, text: str, tokens: List[int], logprobs: Optional[List[float]]) -> dict:
        if logprobs is None:
            return {"generation": text}
        return {"generation": text, "tokens": [self.tokenizer.decode([x]) for x in tokens],
                "logprobs": logprobs}


def check_sampling(temperature: Any, top_p: Any, max_gen_len: Any,
                   where: str = "") -> Tuple[float, float, Optional[int]]:
    """Validate sampling settings -> (temperature, top_p, max_gen_len); `where` prefixes the
    names in error messages (e.g. "--" for CLI flags)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise LlamaError(f"{where}temperature={temperature!r} must be >= 0 (0 means greedy)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise LlamaError(f"{where}top_p={top_p!r} must be in (0, 1]")
    if max_gen_len is not None and (isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int)
                                    or max_gen_len < 1):
        raise LlamaError(f"{where}max_gen_len={max_gen_len!r} must be a positive integer (or left out)")
    return float(temperature), float(top_p), max_gen_len


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under logits [N, V] (temperature-free, as in Meta's code) -> [N]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token per row from logits [B, V]: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return sample_top_p(probs, top_p).squeeze(-1)


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Sample from the nucleus: the smallest set of most likely tokens whose mass reaches p.

    probs: [B, V] probabilities. Returns [B, 1] token ids.
    """
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    # A token belongs to the nucleus if the more likely tokens have not yet reached p.
    if p < 1.0:
        sorted_probs = sorted_probs.masked_fill(mass_before >= p, 0.0)
        sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, num_samples=1)
    return torch.gather(order, -1, choice)


def _check_finite(logits: torch.Tensor, dtype: torch.dtype) -> None:
    """NaN/inf logits (typically fp16 overflow) would silently give garbage tokens."""
    # One reduction: a sum is NaN/inf exactly when some logit is (finite logits are far
    # too small to overflow fp32 when added up).
    if not bool(torch.isfinite(logits.sum())):
        raise LlamaError(f"the model produced NaN or inf logits (model dtype {dtype}); the usual "
                         f"cause is fp16 overflow: build with dtype='bf16' or dtype='fp32'")
