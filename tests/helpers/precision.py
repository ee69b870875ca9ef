"""What the default dtype is on this machine, read independently of llama.runtime.devices, and
how far bf16 results may lie from fp32 ones (the bounds the tests hold the engine to)."""

import torch

# How far the bf16 model's next-token distributions may lie from the fp32 one's, same weights,
# every position of the prompts (tiny random model, logits up to ~19): total variation distance
# (measured at most 0.027) and |log-prob| (measured at most 0.32; bf16 keeps 8 bits of mantissa).
BF16_TV_BOUND, BF16_LOGPROB_BOUND = 0.06, 0.6
BF16_TIE_GAP = 0.25  # logits: a near tie in bf16, two units of the last place at logits of 16-32,
                    # where kernel rounding may decide


def _flags_from_cpuinfo() -> set:
    """This machine's CPU flags, read here independently of llama.runtime.devices."""
    try:
        with open("/proc/cpuinfo") as f:
            return {word for line in f if line.startswith(("flags", "Features")) for word in line.split()}
    except OSError:
        return set()


NATIVE_BF16_HERE = bool(_flags_from_cpuinfo() & {"avx512_bf16", "amx_bf16", "bf16"})
DEFAULT_HERE = torch.bfloat16 if NATIVE_BF16_HERE else torch.float32


# fp32: the same position computed in another pass shape (alone, inside a longer prefill, in a
# wider fixed-shape step) rounds alike to this.
FP32_LOGPROB_TOLERANCE = 1e-5


def assert_same_completions(got, expected, atol: float = FP32_LOGPROB_TOLERANCE) -> None:
    """Two lists of completions (with logprobs): the same tokens, logprobs within atol."""
    assert [g["tokens"] for g in got] == [e["tokens"] for e in expected]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g["logprobs"], e["logprobs"], rtol=0, atol=atol)


def switched_pair(ckpt, tokenizer, switch: str):
    """The same weights built twice in fp32 on the CPU (4 rows of 256), with Llama.build's
    boolean argument `switch` on and off."""
    from llama import Llama

    def build(on: bool):
        return Llama.build(str(ckpt), tokenizer, max_seq_len=256, max_batch_size=4, device="cpu", dtype="fp32",
                           **{switch: on})
    return build(True), build(False)
