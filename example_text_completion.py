"""Complete a few text prompts. Runs as `python example_text_completion.py --ckpt_dir ...`
or under `torchrun --nproc_per_node N example_text_completion.py ...`."""

from typing import List, Optional

from llama import Llama
from llama.cli import path_flags, print_streamed, print_timing, run
from llama.demo import ensure_demo


@path_flags("ckpt_dir", "tokenizer_path")
def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    model_parallel_size: Optional[int] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    stream: bool = False,
):
    """Without --ckpt_dir, runs the bundled demo model (fetched and converted on first use).
    With --stream, each completion is printed as it is generated, one prompt at a time."""
    generator = Llama.build(
        ckpt_dir=ckpt_dir if ckpt_dir is not None else str(ensure_demo()),
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        model_parallel_size=model_parallel_size,
        dtype=dtype,
        quantize=quantize,
    )
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
