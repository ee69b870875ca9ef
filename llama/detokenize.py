"""Tokens -> text, incrementally: the one detokenizer of the engine. The streaming API, the
server, the batch job and the logprob entries of every result use it, so a token has the
same text everywhere.

Detokenizers are context-sensitive (a sentencepiece word's leading space, a character split
over byte tokens), so the whole sequence is decoded again after each token, and text is
released only once it can no longer change: never a trailing incomplete character (U+FFFD),
never a tail that might be the start of a stop string. When a stop string appears, the text
ends before it.

A token's own text (what its logprob entry shows) is what it adds to the text of the tokens
before it in the same sequence; where it changes that text instead (it completes a character
begun before it), its text alone. So the tokens' texts join to the sequence's text.

`context`: tokens the sequence continues (a completion's prompt, in the server), decoded with
it so that its first word keeps the space before it, but not part of its text. The Llama API
gives none: its `generation` is the answer decoded alone, as Meta's.
"""

from typing import List, Optional, Sequence

from .tokenizer import Tokenizer

CONTEXT_TOKENS = 8  # enough before a token to settle its leading space and split characters


def token_text(tokenizer: Tokenizer, token: int, before: Sequence[int] = ()) -> str:
    """The text `token` adds after the tokens `before` (see the module docstring)."""
    before = list(before[-CONTEXT_TOKENS:])
    prior = tokenizer.decode(before)
    text = tokenizer.decode(before + [token])
    return text[len(prior):] if text.startswith(prior) else tokenizer.decode([token])


def token_texts(tokenizer: Tokenizer, tokens: Sequence[int], context: Sequence[int] = ()) -> List[str]:
    """The text of each of `tokens`, a sequence that continues `context`."""
    ids = list(context[-CONTEXT_TOKENS:]) + list(tokens)
    offset = len(ids) - len(tokens)
    return [token_text(tokenizer, ids[i], ids[:i]) for i in range(offset, len(ids))]


class Detokenizer:
    """The text of one sequence as its tokens arrive. add() each token, then take() the text
    that is final so far; finish() at the end returns the rest. text_of(token) before adding
    it gives that token's own text (for logprob entries). stops: strings that end the text
    before them (OpenAI's `stop`); `stopped` tells."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = (), stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.context = list(context[-CONTEXT_TOKENS:])
        self.context_text = tokenizer.decode(self.context)
        self.stops = [s for s in stops if s]
        self.tokens: List[int] = []
        self.sent = ""  # text released so far
        self.stopped = False  # a stop string was met: the text is complete

    def add(self, token: int) -> None:
        self.tokens.append(token)

    def text_of(self, token: int) -> str:
        """The text `token` would add next: its own text if it is added next, an alternative's
        text for top logprobs."""
        return token_text(self.tokenizer, token, self.context + self.tokens)

    def take(self) -> str:
        """The newly final text (maybe ""); sets `stopped` when a stop string ends the text."""
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text, the sequence being complete."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.context + self.tokens)
        if text.startswith(self.context_text):
            text = text[len(self.context_text):]
        else:  # the context decodes differently with the sequence after it: the sequence alone
            text = self.tokenizer.decode(self.tokens)
        cut = self._first_stop(text)
        if cut is not None:
            text, final, self.stopped = text[:cut], True, True
        if not final:
            text = text.rstrip("\ufffd")
            text = text[: len(text) - self._stop_prefix(text)]
        if not final and not text.startswith(self.sent):
            # Decoding more tokens changed text already released (rare): wait for the end,
            # which then sends what follows the released part.
            return ""
        piece = text[len(self.sent):]
        self.sent += piece
        return piece

    def _first_stop(self, text: str) -> Optional[int]:
        """Where the first stop string in `text` begins, or None."""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest tail of `text` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
