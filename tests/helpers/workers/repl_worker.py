"""Worker for tests/test_chat_repl.py, launched under torchrun: the chat REPL on two ranks
while the user on rank 0 takes longer to type than LLAMA_DIST_TIMEOUT allows any one wait.

Usage: torchrun --nproc_per_node 2 tests/helpers/workers/repl_worker.py CKPT TOKENIZER TYPING_S OUT_DIR
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository

from llama import Llama  # noqa: E402
from llama.chat import ChatSession, repl  # noqa: E402


def main(ckpt: str, tokenizer: str, typing_s: str, out: str) -> None:
    generator = Llama.build(ckpt, tokenizer, max_seq_len=64, max_batch_size=1, device="cpu")
    os.environ["LLAMA_DIST_TIMEOUT"] = "2"  # the REPL's waits: far shorter than the typing
    session = ChatSession(generator, temperature=0, max_gen_len=4)
    typed = iter(["Hello there", None])

    def slow_typist():
        time.sleep(float(typing_s))
        return next(typed)

    start = time.monotonic()
    repl(generator, session, slow_typist)
    rank = os.environ["RANK"]
    Path(out, f"rank{rank}.txt").write_text(f"{time.monotonic() - start:.1f} {len(session.turns)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
