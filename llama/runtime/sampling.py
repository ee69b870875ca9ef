"""Sampling that does not depend on batching: a row's next token is a function of its
logits, its sampling arguments and its noise, and the noise is a function of (request key,
step, token id) alone, never of the other rows, the batch size or the order of work.

Nucleus sampling in its exponential-race form: among the nucleus tokens (the smallest set of
most likely tokens whose mass reaches top_p), pick argmax p_i / E_i with E_i = -log(U_i)
exponential; token i wins with probability p_i / sum(nucleus p). The uniforms U_i come from
a counter-based hash computed with integer tensor ops (exact, so identical on every device),
keyed by the request's 63-bit key, the step (how many tokens the request has generated) and
the token id. Rows with temperature 0 take the argmax.
"""

import hashlib
import math
from typing import Any, Optional, Tuple, Union

import torch

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

def _members(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus membership over probs sorted in descending order [B, N]: a token is in when the
    more likely tokens have not yet reached top_p; the most likely always is (so a top_p that
    rounds to 0 means the likeliest token)."""
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    member = mass_before < top_p.unsqueeze(1)
    member[:, 0] = True
    return member


def _trim(ids: torch.Tensor, probs: torch.Tensor,
          member: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = int(member.sum(dim=-1).max())
    return ids[:, :width], probs[:, :width], member[:, :width]


def nucleus(probs: torch.Tensor, top_p: torch.Tensor,
            candidates: int = 256) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nucleus of each row: probs [B, V], top_p [B] -> (token ids [B, N], their probs [B, N],
    membership mask [B, N]), most likely first (equal probs: lower id first, as a stable sort
    gives), N the largest nucleus in the batch.

    Language models are usually sure enough that the nucleus lies among the few most likely
    tokens: the top `candidates` are taken with topk and used when every row's nucleus ends on
    a prob above the last candidate's (so no token tied with a member was left out); otherwise
    the whole vocabulary is sorted. Either way the result is the same."""
    if candidates < probs.shape[-1]:
        values, ids = torch.topk(probs, candidates, dim=-1)
        ids, by_id = torch.sort(ids, dim=-1)  # ties in id order, as the stable full sort has them
        values, order = torch.sort(values.gather(1, by_id), dim=-1, descending=True, stable=True)
        ids = ids.gather(1, order)
        member = _members(values, top_p)
        smallest = values.masked_fill(~member, math.inf).min(dim=-1).values
        if bool((smallest > values[:, -1]).all()):
            return _trim(ids, values, member)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    return _trim(order, sorted_probs, _members(sorted_probs, top_p))


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
           steps: torch.Tensor) -> torch.Tensor:
    """Next token per row: logits [B, V]; temperature, top_p (float) and keys, steps (int64),
    all [B] on the logits' device. Temperature 0 is greedy (argmax of the raw logits)."""
    tokens = logits.max(dim=-1).indices  # argmax (the first of equal maxima), faster on the CPU
    hot = temperature > 0
    if bool(hot.any()):
        rows = hot.nonzero().squeeze(1)
        probs = tempered_probs(logits[rows], temperature[rows])
        ids, kept, member = nucleus(probs, top_p[rows])
        tokens[rows] = race(ids, kept, member, keys[rows], steps[rows])
    return tokens


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
