"""python -m llama.chat: a multi-turn chat in the terminal, with streamed replies.

Type a message and press Enter; `/reset` starts the conversation again (the system prompt
stays), `/exit` or Ctrl-D quits. When the history outgrows --max_seq_len the oldest
exchanges are dropped (and you are told). Under torchrun, rank 0 reads the terminal and
hands every line to the other ranks, so all of them run the same generation.
"""

import sys
from typing import Callable, Iterator, List, Optional

import torch.distributed as dist

from .chat_format import Dialog, Message
from .cli import ModelFlags, path_flags, run, with_model_flags
from .errors import LlamaError
from .generation import Llama
from .runtime.distributed import FromMainRank
from .runtime.sampling import check_sampling
from .utils.checks import check_text
from .utils.ranks import is_main_rank

HELP = "/reset clears the conversation (keeps the system prompt), /exit or Ctrl-D quits"
PROMPT = "> "


class ChatSession:
    """The history of one conversation and the settings its replies are sampled with."""

    def __init__(self, generator: Llama, system: Optional[str] = None, temperature: float = 0.6,
                 top_p: float = 0.9, max_gen_len: Optional[int] = None):
        check_sampling(temperature, top_p, max_gen_len, where="--")
        self.generator = generator
        self.system = None if system is None else check_text(system, "--system")
        self.temperature, self.top_p, self.max_gen_len = temperature, top_p, max_gen_len
        self.turns: List[Message] = []  # user/assistant messages, alternating
        max_seq_len = generator.model.params.max_seq_len
        # Room kept free for the reply when old turns must go: max_gen_len, or a quarter of the
        # context, but never more than half of it.
        self.reply_room = min(max_gen_len or max_seq_len // 4, max_seq_len // 2)

    def reset(self) -> None:
        self.turns = []

    def dialog(self, user: str, turns: Optional[List[Message]] = None) -> Dialog:
        """The dialog that asks for a reply to `user` after `turns` (default: the history)."""
        system: List[Message] = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.turns if turns is None else turns) + [{"role": "user", "content": user}]

    def make_room(self, user: str) -> int:
        """Drop the oldest exchanges until the prompt leaves room for a reply; return how many
        were dropped. LlamaError (history untouched) if the message does not fit even alone."""
        max_seq_len = self.generator.model.params.max_seq_len
        turns = self.turns
        while True:
            n = len(self.generator.formatter.encode_dialog_prompt(self.dialog(user, turns)))
            if n + self.reply_room <= max_seq_len or not turns:
                break
            turns = turns[2:]
        if n >= max_seq_len:
            raise LlamaError(f"this message makes a prompt of {n} tokens, too long for "
                             f"--max_seq_len={max_seq_len}; send a shorter one or restart with a "
                             f"larger --max_seq_len")
        dropped = (len(self.turns) - len(turns)) // 2
        self.turns = turns
        return dropped

    def ask(self, user: str) -> Iterator[str]:
        """Stream the reply to `user`; the exchange joins the history once the reply is complete."""
        dialog = self.dialog(user)
        if self.generator.formatter.is_unsafe(dialog):
            raise LlamaError(f"{self.generator.formatter.UNSAFE_ERROR} Rephrase the message.")
        pieces = self.generator.stream_chat(dialog, self.temperature, self.top_p, self.max_gen_len)
        reply = []
        for piece in pieces:
            reply.append(piece)
            yield piece
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(reply)}]


class SharedInput:
    """The main rank's input lines, handed to every rank (runtime.distributed.FromMainRank): the
    others wait in bounded steps however long the user takes to type, and a rank that dies
    or hangs ends the chat on the others within LLAMA_DIST_TIMEOUT. In a world of one it is
    read_line itself."""

    def __init__(self, read_line: Callable[[], Optional[str]]):
        self.read_line = read_line
        self.shared = FromMainRank()

    def next_line(self) -> Optional[str]:
        """The next line (None: quit), the same on every rank."""
        try:
            return self.shared.get(self.read_line, "reading the terminal")
        except KeyboardInterrupt:  # Ctrl-C at the prompt: quit, on every rank
            return None


def repl(generator: Llama, session: ChatSession, read_line: Callable[[], Optional[str]]) -> None:
    """Read lines (the main rank calls read_line; None means quit) and answer them until /exit."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    main_rank = is_main_rank()
    lines = SharedInput(read_line)

    def note(text: str) -> None:
        if main_rank:
            print(text, file=sys.stderr, flush=True)

    while True:
        line = lines.next_line()
        text = line.strip() if line is not None else "/exit"
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            note("(conversation cleared)")
            continue
        if not text:
            continue
        if text.startswith("/") and " " not in text:
            note(f"unknown command {text}: {HELP}")
            continue
        printed = False  # part of a reply is on the screen
        try:
            check_text(text, "this message")
            dropped = session.make_room(text)
            if dropped:
                note(f"(history too long for max_seq_len={generator.model.params.max_seq_len}: "
                     f"dropped the oldest {dropped} exchange{'s' if dropped > 1 else ''})")
            for piece in session.ask(text):
                print(piece, end="", flush=True)
                printed = True
            print(flush=True)
            note(generator.last_stats.summary())
        except LlamaError as exc:
            print(end="\n" if printed else "", flush=True)
            note(f"error: {exc} (the conversation is kept)")
        except KeyboardInterrupt:
            if world > 1:
                raise  # the other ranks cannot be told to stop mid-reply
            print(end="\n" if printed else "", flush=True)
            note("(reply interrupted; it is not kept in the history)")
        except Exception as exc:  # a bug: one line must not cost the user the conversation
            if world > 1:
                raise  # the ranks may no longer agree on where they are
            print(end="\n" if printed else "", flush=True)
            note(f"error: {type(exc).__name__}: {exc} (a bug in llama: please report it; the reply is "
                 f"not kept, the conversation is)")


def read_stdin() -> Optional[str]:
    """One line from the terminal, or None at end of input (Ctrl-D) or Ctrl-C. Bytes that
    are not UTF-8 come through as surrogates (U+DC80-U+DCFF), which the message check then
    refuses with their position, instead of input() failing and ending the chat."""
    if getattr(sys.stdin, "errors", None) not in (None, "surrogateescape"):
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        return input(PROMPT)
    except (EOFError, KeyboardInterrupt):
        print(flush=True)
        return None


@with_model_flags(max_seq_len=2048, max_batch_size=1)
@path_flags("system")
def main(
    model: ModelFlags,
    system: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: Optional[int] = None,
):
    """Chat with a model in the terminal. The conversation is kept up to --max_seq_len tokens;
    older exchanges are dropped.

    Args:
        system: a system prompt for the whole conversation.
        temperature: 0 is greedy; higher samples more freely.
        top_p: sample among the most likely tokens whose probabilities reach this sum.
        max_gen_len: the longest reply, in tokens; default: whatever room is left.
    """
    check_sampling(temperature, top_p, max_gen_len, where="--")
    generator = model.build()
    session = ChatSession(generator, None if system is None else str(system), temperature, top_p,
                          max_gen_len)
    if is_main_rank():
        if sys.stdin.isatty():
            try:
                import readline  # noqa: F401 - line editing and history for input()
            except ImportError:
                pass
        print(f"Chatting with {model.ckpt_dir or 'the demo model'}; {HELP}.", flush=True)
    repl(generator, session, read_stdin)


if __name__ == "__main__":
    run(main)
