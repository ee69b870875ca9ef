"""Generated tokens -> text pieces for a streamed answer, cut at stop strings as OpenAI does.

The whole answer is decoded again after every token (detokenizers are context-sensitive: a
sentencepiece word's leading space, a character split over byte tokens), and text is released
only once it can no longer change: never a trailing incomplete character (U+FFFD), never a tail
that might be the start of a stop string. When a stop string appears, the text ends before it.
"""

from typing import List, Optional, Sequence, Tuple

from .tokenizer import Tokenizer


class TextStream:
    """The text of one answer as its tokens arrive. add() each token, then take() the text
    that is final so far; finish() at the end returns the rest. context: tokens the answer
    continues (a completion's prompt), decoded with it so that its first word keeps the space
    before it (sentencepiece drops a leading space), but not part of it."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = (), context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.context = list(context[-8:])  # a few tokens are enough for the space and split characters
        self.context_text = tokenizer.decode(self.context)
        self.tokens: List[int] = []
        self.sent = ""  # text released so far
        self.stopped = False  # a stop string was met: the text is complete

    def add(self, token: int) -> None:
        self.tokens.append(token)

    def take(self) -> str:
        """The newly final text (maybe ""); sets `stopped` when a stop string ends the answer."""
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text, the answer being complete."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.context + self.tokens)
        if text.startswith(self.context_text):
            text = text[len(self.context_text):]
        else:  # the context decodes differently with the answer after it: the answer alone
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


def split_stops(value: object) -> Tuple[str, ...]:
    """OpenAI's `stop`: a string or a list of up to 4 strings -> a tuple (ValueError otherwise)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise ValueError(f"stop={value!r:.80} must be a string or a list of at most 4 strings")
