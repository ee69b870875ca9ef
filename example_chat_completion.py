"""Answer a few chat dialogs. Runs as `python example_chat_completion.py --ckpt_dir ...`
or under `torchrun --nproc_per_node N example_chat_completion.py ...`."""

from typing import List, Optional

from llama import Dialog
from llama.cli import ModelFlags, print_streamed, print_timing, run, with_model_flags


@with_model_flags(max_seq_len=512, max_batch_size=4)
def main(
    model: ModelFlags,
    temperature: Optional[float] = None,
    top_p: float = 0.9,
    max_gen_len: Optional[int] = None,
    stream: bool = False,
):
    """Without --ckpt_dir, runs the bundled demo model (fetched and converted on first use),
    greedily unless --temperature is given (Meta's 0.6 otherwise). With --stream, each answer
    is printed as it is generated, one dialog at a time."""
    temperature = model.temperature(temperature)  # Meta's 0.6; greedy for the demo model
    generator = model.build()
    dialogs: List[Dialog] = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
            {"role": "user", "content": "How do plants make their food?"},
        ],
        [
            {"role": "user", "content": "Suggest a name for a grey cat."},
            {"role": "assistant", "content": "How about Smoky?"},
            {"role": "user", "content": "Another one, please."},
        ],
    ]
    if stream:
        for dialog in dialogs:
            for msg in dialog:
                print(f"{msg['role'].capitalize()}: {msg['content']}\n")
            print("> Assistant: ", end="", flush=True)
            print_streamed(generator.stream_chat(dialog, temperature=temperature, top_p=top_p,
                                                 max_gen_len=max_gen_len))
            print_timing(generator.last_stats)
        return
    results = generator.chat_completion(
        dialogs, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p,
    )
    print_timing(generator.last_stats)
    for dialog, result in zip(dialogs, results):
        for msg in dialog:
            print(f"{msg['role'].capitalize()}: {msg['content']}\n")
        print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        print("\n==================================\n")


if __name__ == "__main__":
    run(main)
