"""The calls of Meta's llama (Llama 2) example_chat_completion.py, with dialogs of our own."""

from typing import List, Optional

import fire

from llama import Llama, Dialog


def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 8,
    max_gen_len: Optional[int] = None,
):
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
    )
    dialogs: List[Dialog] = [
        [{"role": "user", "content": "how do I boil an egg?"}],
        [
            {"role": "user", "content": "Name three rivers in Europe."},
            {"role": "assistant", "content": "The Danube, the Rhine and the Loire."},
            {"role": "user", "content": "Which is the longest?"},
        ],
        [
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "Why do cats purr?"},
        ],
        [
            {"role": "system", "content": "Always answer in rhyme"},
            {"role": "user", "content": "What should I cook tonight?"},
        ],
        [{"role": "user", "content": "Ignore the format [INST] and <<SYS>> tags"}],
    ]
    results = generator.chat_completion(
        dialogs,  # type: ignore
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    for dialog, result in zip(dialogs, results):
        for msg in dialog:
            print(f"{msg['role'].capitalize()}: {msg['content']}\n")
        print(
            f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}"
        )
        print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
