"""Sampling that does not depend on batching: a row's next token is a function of its
logits, its sampling arguments and its noise, and the noise is a function of (request key,
step, token id) alone, never of the other rows, the batch size or the order of work.

Nucleus sampling in its exponential-race form: among the nucleus tokens (the smallest set of
most likely tokens whose mass reaches top_p), pick argmax p_i / E_i with E_i = -log(U_i)
exponential; token i wins with probability p_i / sum(nucleus p). The uniforms U_i come from
a counter-based hash computed with integer tensor ops (exact, so identical on every device),
keyed by the request's 63-bit key, the step (how many tokens the request has generated) and
the token id. Rows with temperature 0 take the argmax.

Sampling controls (SamplingControls, all off by default), per request, in this order:
  1. the logits are adjusted: logit_bias added to the raw logits; then the repetition penalty
     (HF's RepetitionPenaltyLogitsProcessor, vLLM): for every token in the prompt or generated
     so far, a positive logit is divided by it, a negative one multiplied; then OpenAI's
     presence and frequency penalties over the tokens generated so far (not the prompt):
     logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0).
     Greedy rows take the argmax of these adjusted logits, sampled rows go on:
  2. probs = softmax(adjusted logits / T); min_p keeps the tokens with prob >= min_p * the
     largest prob; top_k keeps the k most likely (ties with the k-th kept, as HF's
     TopKLogitsWarper); top_p then takes the nucleus of what is left, renormalised (as HF's
     TopK then TopP warpers, and vLLM); the race picks among it with the same noise.
With every control off a row samples exactly as without them, and a row without controls
samples exactly the same whatever controls its batch mates have. Reported logprobs are not
affected: they are the raw model's (llama.runtime.engine).
"""

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import torch

from ..errors import LlamaError
from ..utils.checks import real_number, whole_number

_MASK32 = 0xFFFFFFFF


def check_sampling(temperature: Any, top_p: Any, max_gen_len: Any,
                   where: str = "") -> Tuple[float, float, Optional[int]]:
    """Validate sampling settings -> (temperature, top_p, max_gen_len) as Python numbers;
    numpy scalars are accepted. `where` prefixes the names in error messages (e.g. "--")."""
    t = real_number(temperature, f"{where}temperature", low=0, hint=" (0 means greedy)")
    p = real_number(top_p, f"{where}top_p", low=0, high=1, above=True)
    return t, p, whole_number(max_gen_len, f"{where}max_gen_len", low=1, optional=True)


def request_key(*parts: Union[int, str]) -> int:
    """A 63-bit sampling key from ints and strings (a seed, a call key, an index, an id),
    the same in every process and Python run (unlike hash())."""
    text = "\x1f".join(f"{type(p).__name__}:{p}" for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def random_key() -> int:
    """A fresh 63-bit key from the global torch RNG (torch.manual_seed makes it reproducible)."""
    return int(torch.randint(0, 2**62, (1,)).item())


# ---- sampling controls -----------------------------------------------------------------------

MAX_LOGIT_BIAS = 300  # entries, as OpenAI's API


@dataclass(frozen=True)
class SamplingControls:
    """A request's sampling controls (the module docstring says what each does); the defaults
    are off. Make them with checked() to have the values validated."""
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    logit_bias: Tuple[Tuple[int, float], ...] = ()  # (token id, bias), sorted by id

    @classmethod
    def checked(cls, top_k: Any = 0, min_p: Any = 0.0, presence_penalty: Any = 0.0, frequency_penalty: Any = 0.0,
                repetition_penalty: Any = 1.0, logit_bias: Any = None, vocab_size: Optional[int] = None,
                where: str = "") -> "SamplingControls":
        """Validated controls (numpy scalars accepted), or a LlamaError that starts with the
        argument's name, prefixed by `where` (e.g. "--" or "prompt 3: "). logit_bias: a dict
        (or a sequence of pairs) of token id -> bias; ids may be strings of digits, as JSON
        keys are; with vocab_size, ids must lie below it."""
        return cls(
            whole_number(top_k, f"{where}top_k", low=0),
            real_number(min_p, f"{where}min_p", low=0, high=1),
            real_number(presence_penalty, f"{where}presence_penalty", low=-2, high=2),
            real_number(frequency_penalty, f"{where}frequency_penalty", low=-2, high=2),
            real_number(repetition_penalty, f"{where}repetition_penalty", low=0, above=True, hint=" (1 is off)"),
            _checked_bias(logit_bias, vocab_size, where))

    def within(self, vocab_size: int, where: str = "") -> "SamplingControls":
        """These controls checked again, logit_bias ids against the model's vocabulary."""
        return SamplingControls.checked(self.top_k, self.min_p, self.presence_penalty, self.frequency_penalty,
                                        self.repetition_penalty, self.logit_bias, vocab_size, where)

    @property
    def active(self) -> bool:
        """Any control not at its default."""
        return self != SamplingControls()

    @property
    def adjusts_logits(self) -> bool:
        """logit_bias or a penalty: step 1 of the module docstring."""
        return bool(self.logit_bias) or self.penalizes

    @property
    def penalizes(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty != 1

    @property
    def cuts(self) -> bool:
        """min_p or top_k: step 2's cuts."""
        return bool(self.top_k or self.min_p)


def _checked_bias(value: Any, vocab_size: Optional[int], where: str) -> Tuple[Tuple[int, float], ...]:
    name = f"{where}logit_bias"
    if value is None:
        return ()
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise LlamaError(f"{name}={value!r:.80} must be a dict of token id -> bias (or a list of such pairs)")
    if len(pairs) > MAX_LOGIT_BIAS:
        raise LlamaError(f"{name} has {len(pairs)} entries; at most {MAX_LOGIT_BIAS} are allowed")
    high = vocab_size - 1 if vocab_size is not None else None
    biases = {}
    for key, bias in pairs:
        if isinstance(key, str) and key.isascii() and key.isdigit():
            key = int(key)  # JSON object keys are strings
        token = whole_number(key, f"{name} key", low=0, high=high)
        if token in biases:
            raise LlamaError(f"{name} key={token} is given twice")
        biases[token] = real_number(bias, f"{name} value", low=-100, high=100, hint=f" (for token {token})")
    return tuple(sorted(biases.items()))


class ControlState:
    """One request's controls as the sampler applies them to its row, on the device: its
    logit_bias as tensors, and its tokens as the penalties need them (how often each was
    generated; which were seen, prompt included), kept up to date by add()."""

    def __init__(self, controls: SamplingControls, prompt: Sequence[int], vocab_size: int, device: torch.device):
        self.controls = controls
        self.bias_ids = self.bias = None
        if controls.logit_bias:
            ids, bias = zip(*controls.logit_bias)
            self.bias_ids = torch.tensor(ids, dtype=torch.long, device=device)
            self.bias = torch.tensor(bias, dtype=torch.float32, device=device)
        self.counts = self.seen = None
        if controls.presence_penalty or controls.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if controls.repetition_penalty != 1:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(list(prompt), dtype=torch.long, device=device)] = True

    def add(self, token: int) -> None:
        """The request generated `token`."""
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True

    def adjust(self, logits: torch.Tensor) -> None:
        """Step 1 of the module docstring on one row's float32 logits [V], in place."""
        c = self.controls
        if self.bias is not None:
            logits.index_add_(0, self.bias_ids, self.bias)
        if self.seen is not None:
            rep = c.repetition_penalty
            logits.copy_(torch.where(self.seen, torch.where(logits > 0, logits / rep, logits * rep), logits))
        if self.counts is not None:
            logits -= c.frequency_penalty * self.counts + c.presence_penalty * (self.counts > 0)
        # An extreme repetition_penalty may overflow; keep the logits finite (no inf - inf later).
        big = torch.finfo(torch.float32).max
        logits.clamp_(-big, big)


def _cut(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Step 2's cuts: float32 logits [R, V] with -inf where min_p or top_k leaves a token out
    (min_p, top_k [R]; 0 is off). top_k compares logits, as HF's TopKLogitsWarper does."""
    logits = logits.float()
    probs = tempered_probs(logits, temperature)
    keep = probs >= min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    k = top_k.clamp(max=logits.shape[-1])
    if bool((k > 0).any()):
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
        keep &= (logits >= kth) | (k == 0).unsqueeze(1)
    return logits.masked_fill(~keep, -math.inf)


# ---- counter-based noise ---------------------------------------------------------------------

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), exact: c is split in 16-bit halves so that no
    product leaves int64."""
    high = x * (c >> 16)
    high &= 0xFFFF
    high <<= 16
    high += x * (c & 0xFFFF)
    return high.bitwise_and_(_MASK32)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply, "lowbias32" constants): a bijection on
    [0, 2^32) in which every input bit flips each output bit with probability ~1/2."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x ^= x >> 15
    x = _mul32(x, 0x846CA68B)
    x ^= x >> 16
    return x


def row_seeds(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One 32-bit seed per (key, step): keys, steps int64 [B] -> int64 [B]."""
    low, high = keys & _MASK32, (keys >> 32) & _MASK32
    return _hash32(_hash32(_hash32(low) ^ high) ^ (steps & _MASK32))


def uniforms(keys: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """U(key, step, token) in (0, 1): keys, steps [B], token_ids [B, N] -> float32 [B, N].
    The row's seed (already mixed from key and step) with the token id mixed in once more;
    23 bits of that, centred in their interval, so U is exact in fp32 and never 0 or 1."""
    bits = _hash32(row_seeds(keys, steps).unsqueeze(1) ^ token_ids)
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / 2**23)


# ---- the sampler -----------------------------------------------------------------------------

def _members(sorted_probs: torch.Tensor, top_p: torch.Tensor, cut: bool = False) -> torch.Tensor:
    """Nucleus membership over probs sorted in descending order [B, N]: a token is in when the
    more likely tokens have not yet reached top_p; the most likely always is (so a top_p that
    rounds to 0 means the likeliest token). With `cut`, tokens of prob 0 (left out by min_p
    or top_k) are not: they could never win the race, and the nucleus stays short."""
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    member = mass_before < top_p.unsqueeze(1)
    if cut:
        member &= sorted_probs > 0
    member[:, 0] = True
    return member


def _trim(ids: torch.Tensor, probs: torch.Tensor,
          member: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = int(member.sum(dim=-1).max())
    return ids[:, :width], probs[:, :width], member[:, :width]


def nucleus(probs: torch.Tensor, top_p: torch.Tensor, candidates: int = 256,
            cut: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nucleus of each row: probs [B, V], top_p [B] -> (token ids [B, N], their probs [B, N],
    membership mask [B, N]), most likely first (equal probs: lower id first, as a stable sort
    gives), N the largest nucleus in the batch.

    Language models are usually sure enough that the nucleus lies among the few most likely
    tokens: the top `candidates` are taken with topk and used when every row's nucleus ends on
    a prob above the last candidate's (so no token tied with a member was left out); otherwise
    the whole vocabulary is sorted. Either way the result is the same. `cut`: see _members."""
    if candidates < probs.shape[-1]:
        values, ids = torch.topk(probs, candidates, dim=-1)
        ids, by_id = torch.sort(ids, dim=-1)  # ties in id order, as the stable full sort has them
        values, order = torch.sort(values.gather(1, by_id), dim=-1, descending=True, stable=True)
        ids = ids.gather(1, order)
        member = _members(values, top_p, cut)
        smallest = values.masked_fill(~member, math.inf).min(dim=-1).values
        if bool((smallest > values[:, -1]).all()):
            return _trim(ids, values, member)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    return _trim(order, sorted_probs, _members(sorted_probs, top_p, cut))


def tempered_probs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """softmax(logits / T) per row, logits [B, V], T [B] > 0, fp32. The row's maximum is
    subtracted before dividing, so a tiny T (1e-45) gives the one-hot of the argmax instead of
    inf / inf; T is clamped to the smallest normal fp32 for the same reason."""
    logits = logits.float()
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    t = temperature.to(torch.float32).clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)
    return torch.softmax(shifted / t, dim=-1)


def race(token_ids: torch.Tensor, probs: torch.Tensor, member: torch.Tensor, keys: torch.Tensor,
         steps: torch.Tensor) -> torch.Tensor:
    """The exponential race among members: argmax p / E, E = -log U(key, step, token) -> [B]."""
    noise = -torch.log(uniforms(keys, steps, token_ids))
    score = (torch.log(probs) - torch.log(noise)).masked_fill(~member, -math.inf)
    return token_ids.gather(1, score.argmax(dim=1, keepdim=True)).squeeze(1)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, keys: torch.Tensor,
           steps: torch.Tensor, min_p: Optional[torch.Tensor] = None,
           top_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next token per row: logits [B, V] (adjusted already where a request has logit_bias or
    penalties); temperature, top_p, min_p (float) and keys, steps, top_k (int64), all [B] on
    the logits' device. Temperature 0 is greedy (argmax of the logits). min_p and top_k
    (0 is off) come together or not at all: None leaves every row uncut."""
    tokens = logits.max(dim=-1).indices  # argmax (the first of equal maxima), faster on the CPU
    hot = temperature > 0
    if bool(hot.any()):
        rows = hot.nonzero().squeeze(1)
        hot_logits = logits[rows]
        cut = min_p is not None and top_k is not None
        if cut:
            # Only the rows with cuts are touched: the others keep their logits bit for bit.
            cutting = ((min_p[rows] > 0) | (top_k[rows] > 0)).nonzero().squeeze(1)
            if len(cutting):
                hot_logits = hot_logits.float()
                picked = rows[cutting]
                hot_logits[cutting] = _cut(hot_logits[cutting], temperature[picked], min_p[picked], top_k[picked])
        probs = tempered_probs(hot_logits, temperature[rows])  # renormalised over what the cuts left
        ids, kept, member = nucleus(probs, top_p[rows], cut=cut)
        tokens[rows] = race(ids, kept, member, keys[rows], steps[rows])
    return tokens


def sample_fixed(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, keys: torch.Tensor,
                 steps: torch.Tensor, candidates: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """sample() without cuts in fixed shapes and no host reads (for a captured decode step):
    every row is computed both ways and the greedy or the raced token kept per row.
    Returns (tokens [B], settled [B] bool): a row is settled unless its nucleus may reach past
    the `candidates` most likely tokens; such a row's token must be taken from sample() on its
    logits instead (rare: the nucleus of a language model is usually a few tokens). A settled
    row's token is the one sample() picks."""
    greedy = logits.max(dim=-1).indices
    probs = tempered_probs(logits, temperature)
    if candidates < probs.shape[-1]:  # nucleus()'s first branch, without its trim
        values, ids = torch.topk(probs, candidates, dim=-1)
        ids, by_id = torch.sort(ids, dim=-1)
        values, order = torch.sort(values.gather(1, by_id), dim=-1, descending=True, stable=True)
        ids = ids.gather(1, order)
        member = _members(values, top_p)
        settled = values.masked_fill(~member, math.inf).min(dim=-1).values > values[:, -1]
    else:  # the whole vocabulary is the candidates: nucleus()'s sort
        values, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
        member = _members(values, top_p)
        settled = torch.ones_like(greedy, dtype=torch.bool)
    raced = temperature > 0
    tokens = torch.where(raced, race(ids, values, member, keys, steps), greedy)
    return tokens, settled | ~raced


def sample_top_p(probs: torch.Tensor, p: Union[float, torch.Tensor], keys: Optional[torch.Tensor] = None,
                 steps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Meta's sample_top_p: one token per row from the nucleus of probs [B, V] -> [B, 1].
    keys/steps [B] choose the noise (default: fresh keys from the global torch RNG, step 0)."""
    batch = probs.shape[0]
    if keys is None:
        keys = torch.randint(0, 2**62, (batch,)).to(probs.device)
    if steps is None:
        steps = torch.zeros(batch, dtype=torch.long, device=probs.device)
    top_p = torch.as_tensor(p, dtype=torch.float32, device=probs.device).expand(batch)
    ids, kept, member = nucleus(probs, top_p)
    return race(ids, kept, member, keys, steps).unsqueeze(1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under logits [N, V] (temperature-free, as in Meta's code) -> [N]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
