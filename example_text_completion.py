"""Complete a few text prompts. Runs as `python example_text_completion.py --ckpt_dir ...`
or under `torchrun --nproc_per_node N example_text_completion.py ...`."""

from typing import List, Optional

from llama.cli import ModelFlags, print_streamed, print_timing, run, with_model_flags


@with_model_flags(max_seq_len=128, max_batch_size=4)
def main(
    model: ModelFlags,
    temperature: Optional[float] = None,
    top_p: float = 0.9,
    max_gen_len: int = 64,
    stream: bool = False,
):
    """Without --ckpt_dir, runs the bundled demo model (fetched and converted on first use),
    greedily unless --temperature is given (Meta's 0.6 otherwise). With --stream, each
    completion is printed as it is generated, one prompt at a time."""
    temperature = model.temperature(temperature)  # Meta's 0.6; greedy for the demo model
    generator = model.build()
    prompts: List[str] = [
        # Plain continuation
        "The three most useful things to pack for a week of hiking are",
        # Few-shot pattern
        "Opposites:\nhot => cold\nearly => late\nloud =>",
        # A question
        "Q: Why is the sky blue?\nA:",
    ]
    if stream:
        for prompt in prompts:
            print(prompt)
            print("> ", end="", flush=True)
            print_streamed(generator.stream_completion(prompt, temperature=temperature, top_p=top_p,
                                                       max_gen_len=max_gen_len))
            print_timing(generator.last_stats)
        return
    results = generator.text_completion(
        prompts, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p,
    )
    print_timing(generator.last_stats)
    for prompt, result in zip(prompts, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    run(main)
