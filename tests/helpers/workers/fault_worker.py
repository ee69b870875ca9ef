"""Worker for tests/test_faults.py, launched under torchrun: build, then generate, the way
the example scripts do (llama.cli.run: a LlamaError becomes one line on stderr, exit 1).

Usage: torchrun --nproc_per_node 2 tests/helpers/workers/fault_worker.py --ckpt_dir D --tokenizer_path T

Faults are injected by this script only, never by library code, from the environment:
  FAULT_RANK1_CKPT=DIR   rank 1 loads DIR instead of --ckpt_dir (e.g. its own bad copy)
  FAULT_KILL_RANK=R      rank R dies abruptly (os._exit(FAULT_EXIT_CODE, default 9))
  FAULT_KILL_AFTER=N     ... after N forward passes of the model (mid-generation)
  FAULT_HANG_RANK=R      rank R hangs (sleeps) instead of generating, alive but silent
  FAULT_OOM_RANK=R       rank R runs out of memory making the model (Transformer.__init__),
                         the first step after the checkpoint was read and checked
  FAULT_SLOW_BUILD_RANK=R  rank R takes FAULT_SLOW_BUILD_S seconds longer to make the model
  FAULT_READ_BYTES_PER_S=B the read speed the build's wait for slow ranks allows for
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository

from llama import Llama  # noqa: E402
from llama.cli import run  # noqa: E402


def main(ckpt_dir: str, tokenizer_path: str, max_gen_len: int = 16):
    rank = int(os.environ.get("RANK", "0"))
    if rank == 1 and os.environ.get("FAULT_RANK1_CKPT"):
        ckpt_dir = os.environ["FAULT_RANK1_CKPT"]
    if os.environ.get("FAULT_OOM_RANK") == str(rank):
        import llama.model

        def out_of_memory(*args, **kwargs):
            raise MemoryError("no room for the model (injected)")

        llama.model.Transformer.__init__ = out_of_memory
    if os.environ.get("FAULT_SLOW_BUILD_RANK") == str(rank):
        import llama.model

        make_model = llama.model.Transformer.__init__

        def slow_to_make(*args, **kwargs):
            time.sleep(float(os.environ["FAULT_SLOW_BUILD_S"]))
            make_model(*args, **kwargs)

        llama.model.Transformer.__init__ = slow_to_make
    if os.environ.get("FAULT_READ_BYTES_PER_S"):
        import llama.runtime.loading

        llama.runtime.loading.SLOW_READ_BYTES_PER_S = float(os.environ["FAULT_READ_BYTES_PER_S"])
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=2, device="cpu")

    if os.environ.get("FAULT_KILL_RANK") == str(rank):
        forward, calls = generator.model.forward, [0]
        kill_after = int(os.environ.get("FAULT_KILL_AFTER", "3"))

        def dying_forward(*args, **kwargs):
            calls[0] += 1
            if calls[0] > kill_after:
                os._exit(int(os.environ.get("FAULT_EXIT_CODE", "9")))
            return forward(*args, **kwargs)

        generator.model.forward = dying_forward

    if os.environ.get("FAULT_HANG_RANK") == str(rank):
        time.sleep(3600)
    results = generator.text_completion(["The capital of France is", "Hi"], temperature=0,
                                        max_gen_len=max_gen_len)
    print(f"rank {rank} done: {results[0]['generation']!r}")


if __name__ == "__main__":
    run(main)
