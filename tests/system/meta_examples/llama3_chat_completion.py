"""The calls of Meta's llama3 example_chat_completion.py, with dialogs of our own."""

from typing import List, Optional

import fire

from llama import Dialog, Llama


def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
):
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
    )
    dialogs: List[Dialog] = [
        [{"role": "user", "content": "how do I make bread without yeast?"}],
        [
            {"role": "user", "content": "I am visiting Rome, what should I see?"},
            {
                "role": "assistant",
                "content": """\
Rome is full of history. A few highlights:

1. The Colosseum: the great amphitheatre of ancient Rome.
2. The Pantheon: a temple with the largest unreinforced concrete dome.
3. Trastevere: a neighbourhood of narrow streets and small restaurants.""",
            },
            {"role": "user", "content": "Tell me more about #2"},
        ],
        [
            {"role": "system", "content": "Always answer in exactly five words"},
            {"role": "user", "content": "What is the moon made of?"},
        ],
        [
            {"role": "system", "content": "Answer with a list"},
            {"role": "user", "content": "How do I get from Lisbon to Porto?"},
        ],
    ]
    results = generator.chat_completion(
        dialogs,
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
