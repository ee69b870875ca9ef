"""Tokens -> text, incrementally: the one detokenizer of the engine. The streaming API, the
server, the batch job and the logprob entries of every result use it, so a token has the
same text everywhere.

Detokenizers are context-sensitive (a sentencepiece word's leading space, a character split
over byte tokens), so text is decoded in a window: the tokens since the last point where the
text was complete, with the chunk before that point as context; what the window adds to its
context's text is the new text. Each token is decoded a bounded number of times, so a long
answer costs time linear in its length. Text is released only once it can no longer change:
never a trailing incomplete character (U+FFFD), never a tail that might be the start of a
stop string. When a stop string appears, the text ends before it. At the end, the whole
sequence is decoded once, so the released text joins to exactly what decode() gives.

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
        self.ids = list(context[-CONTEXT_TOKENS:])  # the context's tail, then the sequence's tokens
        self.start = len(self.ids)
        self.stops = [s for s in stops if s]
        self.sent = ""  # text released so far
        self.stopped = False  # a stop string was met: the text is complete
        self._text = ""  # the sequence's text up to the window (complete characters)
        self._window = (0, self.start)  # ids[a:] is decoded; ids[a:b]'s text is already in _text
        self._searched = 0  # _text before this holds no stop string

    @property
    def tokens(self) -> List[int]:
        return self.ids[self.start:]

    def add(self, token: int) -> None:
        self.ids.append(token)

    def text_of(self, token: int) -> str:
        """The text `token` would add next: its own text if it is added next, an alternative's
        text for top logprobs."""
        return token_text(self.tokenizer, token, self.ids)

    def take(self) -> str:
        """The newly final text (maybe ""); sets `stopped` when a stop string ends the text."""
        if self.stopped:
            return ""
        self._advance()
        return self._release(self._text, final=False)

    def finish(self) -> str:
        """The rest of the text, the sequence being complete."""
        if self.stopped:
            return ""
        context_text = self.tokenizer.decode(self.ids[: self.start])
        text = self.tokenizer.decode(self.ids)
        if text.startswith(context_text):
            text = text[len(context_text):]
        else:  # the context decodes differently with the sequence after it: the sequence alone
            text = self.tokenizer.decode(self.tokens)
        self._searched = 0
        return self._release(text, final=True)

    def _advance(self) -> None:
        """Add the window's new text to _text if it ends on a complete character, and move the
        window on: its last tokens become the next window's context."""
        begin, read = self._window
        before = self.tokenizer.decode(self.ids[begin:read])
        now = self.tokenizer.decode(self.ids[begin:])
        if len(now) > len(before) and now.startswith(before) and not now.endswith("\ufffd"):
            self._text += now[len(before):]
            self._window = (read, len(self.ids))

    def _release(self, text: str, final: bool) -> str:
        cut = self._first_stop(text)
        if cut is not None:
            text, final, self.stopped = text[:cut], True, True
        else:
            self._searched = max(0, len(text) - max((len(s) for s in self.stops), default=1) + 1)
        if not final:
            text = text[: len(text) - self._stop_prefix(text)]
            if not text.startswith(self.sent):
                return ""  # cannot happen with text that only grows; kept as a guard
        piece = text[len(self.sent):]
        self.sent += piece
        return piece

    def _first_stop(self, text: str) -> Optional[int]:
        """Where the first stop string in `text` begins (searched from where it could), or None."""
        found = [i for i in (text.find(s, self._searched) for s in self.stops) if i >= 0]
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
