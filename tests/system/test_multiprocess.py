"""Model parallelism across real processes: torchrun, two ranks over gloo on the CPU.

One torchrun launch (module-scoped fixture) builds, in turn on both ranks, the 2-shard
checkpoint, the 1-shard checkpoint (resharded 1 -> 2) and a 2-shard checkpoint whose
embedding is split on the vocabulary (Llama 3 style), and runs every workload;
each rank dumps its results to its own JSON file. The tests compare those results
with the in-process, world-of-one `generator` built from the same weights.
"""

import json
from pathlib import Path

import pytest
import torch

from helpers import REPO
from helpers.processes import run_torchrun
from llama import Llama
from llama.testing import write_tiny_checkpoint

WORKER = REPO / "tests" / "helpers" / "workers" / "mp_worker.py"
NPROC = 2
JOBS = ["mp2_from_2_shards", "mp2_from_1_shard", "mp2_from_vocab_split"]
DEFAULT_DTYPE_JOB = "mp2_default_dtype"  # the 2-shard checkpoint with no dtype given (bf16 here)
LOOKUP_JOB = "mp2_prompt_lookup"  # the 2-shard checkpoint, prompt-lookup speculative decoding on
DRAFT_JOB = "mp2_draft_model"  # the same, drafted by a draft model (the model itself, sharded alike)
BF16_CACHE_JOB = "mp2_bf16_kv_cache"  # the 2-shard checkpoint in bf16, LLAMA_KV_CACHE=bf16
GGML_MODES = ("q8_0", "q4_0")  # quantized on the native CPU kernels, each rank its own slice
TIMEOUT_S = 180
LOGPROB_ATOL = 1e-4

MAX_SEQ_LEN, MAX_BATCH_SIZE = 64, 4  # as the `generator` fixture
MAX_GEN_LEN = 12
SEED = 1234
# Ragged on purpose: very different lengths in one batch.
PROMPTS = [
    "The capital of France is",
    "Hi",
    "Once upon a time, in a land far, far away, there lived a",
    "1, 2, 3,",
]
# Raw ids, five prompts: more than max_batch_size, so generate() also runs a second chunk.
TOKEN_PROMPTS = [
    [1, 450, 7483],
    [1],
    [1, 319, 2107, 4123, 310, 278, 3186, 338, 263, 1243, 29889, 13],
    [1, 29871, 29896, 29892],
    [1, 306, 626, 263, 1058, 884],
]


@pytest.fixture(scope="module")
def vocab_split_ckpt(tmp_path_factory) -> Path:
    """The same weights in two shards, Llama 3 style: tok_embeddings split on the vocabulary."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny2_vocab_split"), n_shards=2,
                                 vocab_split_embedding=True)


@pytest.fixture(scope="module")
def repeating_ckpts(tmp_path_factory) -> dict:
    """{shards: folder} of a tiny model that mostly says again the token it was given (its
    output matrix is its embedding; the blocks' outputs, scaled down, still count): greedy
    answers repeat, so prompt lookup drafts and the drafts are accepted."""
    from llama.checkpoint.layout import save_checkpoint
    from llama.testing import TINY_PARAMS, random_meta_weights

    weights = random_meta_weights(TINY_PARAMS, seed=3)
    for name in weights:
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            weights[name] = weights[name] * 0.2
    weights["output.weight"] = weights["tok_embeddings.weight"] * 0.5
    folders = {}
    for shards in (1, 2):
        folders[shards] = tmp_path_factory.mktemp(f"repeating{shards}")
        save_checkpoint(weights, dict(TINY_PARAMS), str(folders[shards]), shards, False)
    return folders


@pytest.fixture(scope="module")
def mp2_run(tmp_path_factory, tiny_ckpt, tiny_ckpt_mp2, vocab_split_ckpt, repeating_ckpts, sp_tokenizer):
    """Run tests/helpers/workers/mp_worker.py under torchrun with two ranks; return each rank's results."""
    work = tmp_path_factory.mktemp("mp2_run")
    spec = {
        "tokenizer": sp_tokenizer, "out": str(work), "max_seq_len": MAX_SEQ_LEN,
        "max_batch_size": MAX_BATCH_SIZE, "max_gen_len": MAX_GEN_LEN, "seed": SEED,
        "prompts": PROMPTS, "token_prompts": TOKEN_PROMPTS,
        "jobs": [{"name": "mp2_from_2_shards", "ckpt": str(tiny_ckpt_mp2)},
                 {"name": "mp2_from_1_shard", "ckpt": str(tiny_ckpt)},
                 {"name": "mp2_from_vocab_split", "ckpt": str(vocab_split_ckpt)},
                 {"name": DEFAULT_DTYPE_JOB, "ckpt": str(tiny_ckpt_mp2), "dtype": "default"},
                 {"name": LOOKUP_JOB, "ckpt": str(repeating_ckpts[2]), "prompt_lookup_num_tokens": 4},
                 {"name": DRAFT_JOB, "ckpt": str(repeating_ckpts[2]), "draft_ckpt": str(repeating_ckpts[2]),
                  "num_assistant_tokens": 3},
                 {"name": BF16_CACHE_JOB, "ckpt": str(tiny_ckpt_mp2), "dtype": "bf16", "kv_cache": "bf16"},
                 *({"name": f"mp2_{mode}", "ckpt": str(tiny_ckpt_mp2), "dtype": "bf16", "quantize": mode}
                   for mode in GGML_MODES)],
    }
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))

    job = run_torchrun(WORKER, [spec_path], timeout_s=TIMEOUT_S, nproc=NPROC, LLAMA_DIST_TIMEOUT="120")
    logs = f"exit {job['rc']} after {job['elapsed']:.1f}s\nstdout:\n{job['stdout'][-4000:]}\n" \
           f"stderr:\n{job['stderr'][-6000:]}"
    assert job["rc"] is not None, f"torchrun did not finish within {TIMEOUT_S}s\n{logs}"
    assert job["rc"] == 0, f"torchrun failed: {logs}"
    ranks = []
    for r in range(NPROC):
        path = work / f"rank{r}.json"
        assert path.is_file(), f"rank {r} wrote no results: {logs}"
        report = json.loads(path.read_text())
        assert "error" not in report, f"rank {r} failed: {report['error']}"
        ranks.append(report)
    return {"ranks": ranks, "elapsed_s": job["elapsed"], "stdout": job["stdout"], "stderr": job["stderr"]}


@pytest.fixture(scope="module")
def reference(generator):
    """The same workloads in this process on the world-of-one `generator` (MP=1)."""
    greedy = generator.text_completion(PROMPTS, temperature=0.0, top_p=0.9,
                                       max_gen_len=MAX_GEN_LEN, logprobs=True)
    continued = generator.text_completion([p + c["generation"] + " and" for p, c in zip(PROMPTS, greedy)],
                                          temperature=0.0, top_p=0.9, max_gen_len=MAX_GEN_LEN, logprobs=True)
    echoed = generator.text_completion(PROMPTS, temperature=0.0, top_p=0.9,
                                       max_gen_len=MAX_GEN_LEN, logprobs=True, echo=True)
    tokens, logprobs = generator.generate(TOKEN_PROMPTS, MAX_GEN_LEN, temperature=0.0, top_p=0.9,
                                          logprobs=True)
    again = [p + t + p + t[:3] for p, t in zip(TOKEN_PROMPTS, tokens)]
    a_tokens, a_logprobs = generator.generate(again, MAX_GEN_LEN, temperature=0.0, top_p=0.9, logprobs=True)
    rng = torch.get_rng_state()
    try:
        torch.manual_seed(SEED)
        s_tokens, s_logprobs = generator.generate(TOKEN_PROMPTS, MAX_GEN_LEN, temperature=0.8,
                                                  top_p=0.9, logprobs=True)
    finally:
        torch.set_rng_state(rng)  # leave the global RNG as other tests expect it
    return {
        "text_greedy": [dict(c) for c in greedy],
        "text_continued": [dict(c) for c in continued],
        "text_greedy_echo": [dict(c) for c in echoed],
        "tokens_greedy": {"tokens": tokens, "logprobs": logprobs},
        "tokens_again": {"tokens": a_tokens, "logprobs": a_logprobs},
        "tokens_sampled": {"tokens": s_tokens, "logprobs": s_logprobs},
    }


def _max_abs_diff(a, b) -> float:
    """Largest |a - b| over ragged lists of floats (same shape asserted by the caller)."""
    return max((abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)), default=0.0)


def _assert_same_results(got: dict, ref: dict, label: str) -> None:
    # text_completion, greedy, with logprobs
    for i, (g, r) in enumerate(zip(got["text_greedy"], ref["text_greedy"], strict=True)):
        assert g["generation"] == r["generation"], f"{label}: prompt {i} text differs"
        assert g["tokens"] == r["tokens"], f"{label}: prompt {i} tokens differ"
        assert g["logprobs"] == pytest.approx(r["logprobs"], abs=LOGPROB_ATOL), \
            f"{label}: prompt {i} logprobs differ"
    # a second turn, its first turn's keys and values reused (prefix cache) on every rank
    for i, (g, r) in enumerate(zip(got["text_continued"], ref["text_continued"], strict=True)):
        assert g["tokens"] == r["tokens"], f"{label}: continued prompt {i} tokens differ"
        assert g["logprobs"] == pytest.approx(r["logprobs"], abs=LOGPROB_ATOL), \
            f"{label}: continued prompt {i} logprobs differ"
    assert got["prefix_reused"] > 0, f"{label}: nothing reused"
    for i, (g, r) in enumerate(zip(got["text_greedy_echo"], ref["text_greedy_echo"], strict=True)):
        assert g["generation"] == r["generation"], f"{label}: echo prompt {i} text differs"
        assert g["tokens"] == r["tokens"], f"{label}: echo prompt {i} tokens differ"
        assert g["logprobs"] == pytest.approx(r["logprobs"], abs=LOGPROB_ATOL), \
            f"{label}: echo prompt {i} logprobs differ"
    # generate() on raw ids, and on each prompt with its answer and the prompt again
    for key in ("tokens_greedy", "tokens_again"):
        g, r = got[key], ref[key]
        assert g["tokens"] == r["tokens"], f"{label}: generate() greedy tokens differ ({key})"
        assert [len(x) for x in g["logprobs"]] == [len(x) for x in r["logprobs"]]
        diff = _max_abs_diff(g["logprobs"], r["logprobs"])
        assert diff <= LOGPROB_ATOL, f"{label}: generate() logprobs differ by up to {diff:.3g} ({key})"


def _job(run: dict, rank: int, name: str) -> dict:
    return run["ranks"][rank]["jobs"][name]


@pytest.mark.parametrize("job", JOBS)
def test_really_two_ranks(mp2_run, job):
    """Both processes joined one gloo world of two and each holds half of every split weight."""
    for rank in range(NPROC):
        res = _job(mp2_run, rank, job)
        assert (res["rank"], res["world_size"], res["model_parallel_size"]) == (rank, NPROC, NPROC)
        assert res["model_parallel_rank"] == rank
        assert res["backend"] == "gloo" and res["device"] == "cpu"
        shapes = res["local_shapes"]
        assert shapes["output.weight"] == [32000 // NPROC, 64]
        # The embedding is split as the shards split it: on the embedding dim (Llama 1/2)
        # or on the vocabulary (Llama 3, and a single shard, which any split fits).
        vocab_split = job != "mp2_from_2_shards"
        assert shapes["tok_embeddings.weight"] == ([32000 // NPROC, 64] if vocab_split else [32000, 64 // NPROC])
        assert shapes["layers.0.attention.wq.weight"] == [64 // NPROC, 64]
        assert shapes["layers.0.attention.wo.weight"] == [64, 64 // NPROC]


@pytest.mark.parametrize("job", [LOOKUP_JOB, DRAFT_JOB])
def test_mp2_with_speculative_decoding_matches_mp1_greedy(mp2_run, repeating_ckpts, sp_tokenizer, job):
    """Speculative decoding at model-parallel size 2, drafted by prompt lookup or by a draft
    model split over the same ranks: every rank drafts and accepts alike (the ranks agree
    exactly), and the greedy tokens are those of one process decoding one at a time."""
    r0, r1 = _job(mp2_run, 0, job), _job(mp2_run, 1, job)
    assert r0["drafted_rows"] == r1["drafted_rows"] > 10
    for key in ("text_greedy", "text_continued", "tokens_greedy", "tokens_again"):
        assert r0[key] == r1[key], key
    one = Llama.build(str(repeating_ckpts[1]), sp_tokenizer, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH_SIZE,
                      device="cpu", dtype="fp32")
    texts = one.text_completion(PROMPTS, temperature=0.0, max_gen_len=MAX_GEN_LEN, logprobs=True)
    tokens, logprobs = one.generate(TOKEN_PROMPTS, MAX_GEN_LEN, temperature=0.0, logprobs=True)
    again = [p + t + p + t[:3] for p, t in zip(TOKEN_PROMPTS, tokens)]
    assert r0["tokens_greedy"]["tokens"] == tokens
    assert r0["tokens_again"]["tokens"] == one.generate(again, MAX_GEN_LEN, temperature=0.0)[0]
    assert [t["tokens"] for t in r0["text_greedy"]] == [t["tokens"] for t in texts]
    assert _max_abs_diff(r0["tokens_greedy"]["logprobs"], logprobs) <= LOGPROB_ATOL


def test_mp2_matches_mp1_greedy(mp2_run, reference):
    """2-shard checkpoint on two ranks == 1-shard checkpoint in one process."""
    for rank in range(NPROC):
        _assert_same_results(_job(mp2_run, rank, "mp2_from_2_shards"), reference,
                             f"MP=2 (2 shards) rank {rank}")


def test_reshard_1_to_2_matches_mp1_greedy(mp2_run, reference):
    """1-shard checkpoint split onto two ranks at load time == the same in one process."""
    for rank in range(NPROC):
        _assert_same_results(_job(mp2_run, rank, "mp2_from_1_shard"), reference,
                             f"MP=2 (resharded 1->2) rank {rank}")


def test_vocab_split_checkpoint_on_two_ranks_matches_mp1_greedy(mp2_run, reference):
    """Vocab-split embedding shards on two ranks: a vocab-parallel embedding, one shard per rank."""
    for rank in range(NPROC):
        _assert_same_results(_job(mp2_run, rank, "mp2_from_vocab_split"), reference,
                             f"MP=2 (vocab-split shards) rank {rank}")


@pytest.mark.parametrize("job", JOBS)
def test_ranks_agree_exactly(mp2_run, job):
    """Every rank decodes the very same tokens, greedy and sampled (same seed, same logits)."""
    r0, r1 = _job(mp2_run, 0, job), _job(mp2_run, 1, job)
    for key in ("tokens_greedy", "tokens_sampled"):
        assert r0[key]["tokens"] == r1[key]["tokens"], f"{job}: ranks disagree on {key}"
        assert r0[key]["logprobs"] == r1[key]["logprobs"], f"{job}: ranks disagree on {key} logprobs"
    assert r0["text_greedy"] == r1["text_greedy"]
    assert r0["text_continued"] == r1["text_continued"] and r0["prefix_reused"] == r1["prefix_reused"] > 0
    assert r0["text_greedy_echo"] == r1["text_greedy_echo"]


@pytest.mark.parametrize("job", JOBS)
def test_seeded_sampling_mp2_matches_mp1(mp2_run, reference, job):
    """Nucleus sampling (T=0.8, top_p=0.9) with the same seed makes the same draws at MP=2
    as at MP=1: every rank seeds alike and sees the same (all-gathered) logits.

    Logits at MP=2 differ from MP=1 by float rounding (~1e-6), so two tokens whose
    probabilities tie to ~1e-6 may swap places in sample_top_p's sort, and the same
    draw then picks the other one (seen in about 1 of 80 seed/temperature settings with
    120 draws each). Each row must therefore match token for token, except that it may
    diverge at such an exact near-tie, shown by the two picks having equal log-probs;
    after that the row's continuations legitimately differ. Draws are per row, so a
    divergence in one row leaves the other rows untouched.
    """
    got, ref = _job(mp2_run, 0, job)["tokens_sampled"], reference["tokens_sampled"]
    diverged = []
    for row, (gt, rt, gl, rl) in enumerate(zip(got["tokens"], ref["tokens"], got["logprobs"],
                                                ref["logprobs"], strict=True)):
        for step, (a, b) in enumerate(zip(gt, rt)):
            if a != b:
                assert abs(gl[step] - rl[step]) <= LOGPROB_ATOL, (
                    f"{job}: row {row} step {step}: MP=2 sampled {a} (logprob {gl[step]:.6f}), "
                    f"MP=1 sampled {b} (logprob {rl[step]:.6f}); not a near-tie, so not rounding")
                diverged.append((row, step))
                break
            assert gl[step] == pytest.approx(rl[step], abs=LOGPROB_ATOL), \
                f"{job}: row {row} step {step}: same token, logprobs differ"
        else:
            assert len(gt) == len(rt), f"{job}: row {row} stopped at a different length"
    # The noise is counter-based and the seed fixed, so this is deterministic: with this seed no
    # near-tie is hit, and none may be (the check above only explains a failure).
    assert diverged == [], f"{job}: rows diverged at {diverged}"
    # Sampling really sampled: not simply the greedy continuation.
    assert got["tokens"] != reference["tokens_greedy"]["tokens"]


@pytest.mark.parametrize("shards", ["vocab_split", "embedding_dim_split"])
def test_two_shard_checkpoint_in_one_process(shards, vocab_split_ckpt, tiny_ckpt_mp2, sp_tokenizer,
                                             generator):
    """Two shards merged back in a world of one (reshard 2 -> 1) decode exactly like the
    1-shard model; with the embedding split on the vocabulary (Llama 3) or on the
    embedding dim (Llama 1/2). The build reuses this process's world of one."""
    from llama import Llama

    ckpt = vocab_split_ckpt if shards == "vocab_split" else tiny_ckpt_mp2
    shard0 = torch.load(ckpt / "consolidated.00.pth", map_location="cpu", weights_only=True)
    expected = (16000, 64) if shards == "vocab_split" else (32000, 32)
    assert shard0["tok_embeddings.weight"].shape == expected  # really split that way
    del shard0

    rng = torch.get_rng_state()  # build seeds the global RNG; keep other tests' state
    try:
        gen = Llama.build(str(ckpt), sp_tokenizer, max_seq_len=MAX_SEQ_LEN,
                          max_batch_size=MAX_BATCH_SIZE, device="cpu")
    finally:
        torch.set_rng_state(rng)
    assert gen.ctx.world_size == 1 and gen.ctx.model_parallel_size == 1
    assert torch.equal(gen.model.tok_embeddings.weight, generator.model.tok_embeddings.weight)

    got, got_lp = gen.generate(TOKEN_PROMPTS, MAX_GEN_LEN, temperature=0.0, top_p=0.9, logprobs=True)
    ref, ref_lp = generator.generate(TOKEN_PROMPTS, MAX_GEN_LEN, temperature=0.0, top_p=0.9,
                                     logprobs=True)
    assert got == ref
    assert _max_abs_diff(got_lp, ref_lp) <= LOGPROB_ATOL
    texts = gen.text_completion(PROMPTS, temperature=0.0, max_gen_len=MAX_GEN_LEN)
    ref_texts = generator.text_completion(PROMPTS, temperature=0.0, max_gen_len=MAX_GEN_LEN)
    assert texts == ref_texts


def test_mp2_in_the_default_dtype(mp2_run, reference, generator):
    """No dtype given, as users run it: both ranks in the CPU's default dtype (bf16 here),
    agreeing exactly with each other (greedy and sampled), and each prompt's scores (echo:
    teacher-forced, so the same contexts) within the stated bf16 bound of the fp32 model's."""
    from helpers.precision import BF16_LOGPROB_BOUND, DEFAULT_HERE

    r0, r1 = _job(mp2_run, 0, DEFAULT_DTYPE_JOB), _job(mp2_run, 1, DEFAULT_DTYPE_JOB)
    assert r0["dtype"] == r1["dtype"] == str(DEFAULT_HERE)
    for key in ("tokens_greedy", "tokens_sampled", "text_greedy", "text_greedy_echo"):
        assert r0[key] == r1[key], f"ranks disagree on {key}"
    worst = 0.0
    for text, got, ref in zip(PROMPTS, r0["text_greedy_echo"], reference["text_greedy_echo"], strict=True):
        n_prompt = len(generator.tokenizer.encode(text, bos=True, eos=False))
        assert got["tokens"][:n_prompt] == ref["tokens"][:n_prompt]
        worst = max(worst, max(abs(a - b) for a, b in zip(got["logprobs"][:n_prompt], ref["logprobs"][:n_prompt])))
    assert worst < BF16_LOGPROB_BOUND
    if DEFAULT_HERE == torch.bfloat16:
        assert worst > 0  # really bf16
    for completion in r0["text_greedy"]:
        completion["generation"].encode("utf-8")  # valid text


def test_mp2_with_a_bf16_kv_cache(mp2_run, reference):
    """LLAMA_KV_CACHE=bf16 over two ranks: each keeps its heads' cache in bf16, the ranks agree
    exactly, and each greedy token's logprob (from the second on, read through the bf16 cache)
    is within the bf16 bound of the fp32 model's, as far as the greedy tokens agree."""
    from helpers.precision import BF16_LOGPROB_BOUND

    r0, r1 = _job(mp2_run, 0, BF16_CACHE_JOB), _job(mp2_run, 1, BF16_CACHE_JOB)
    assert r0["cache_dtype"] == r1["cache_dtype"] == str(torch.bfloat16) and r0["model_parallel_size"] == 2
    for key in ("tokens_greedy", "tokens_sampled", "text_greedy"):
        assert r0[key] == r1[key], f"ranks disagree on {key}"
    worst, decoded = 0.0, 0
    ours, ref = r0["tokens_greedy"], reference["tokens_greedy"]
    for tokens, logprobs, ref_tokens, ref_logprobs in zip(ours["tokens"], ours["logprobs"], ref["tokens"],
                                                          ref["logprobs"], strict=True):
        agree = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        decoded += max(agree - 1, 0)  # tokens past the first: decode steps over the cache
        worst = max([worst] + [abs(a - b) for a, b in zip(logprobs[:agree], ref_logprobs[:agree])])
    assert decoded >= len(ours["tokens"]) * 3, "too few decode steps were compared"
    assert 0 < worst < BF16_LOGPROB_BOUND


@pytest.mark.parametrize("mode", GGML_MODES)
def test_mp2_in_a_ggml_mode_equals_one_process_in_that_mode(mp2_run, sp_tokenizer, tiny_ckpt, generator, mode):
    """GGML block quantization keeps each parallel layer's collective: two ranks in bf16, each
    quantizing its own slice (the same blocks as the unsplit weights'), agree with each other
    exactly and with one process in the same mode within the bf16 bound: each prompt's scores
    (echo: teacher-forced) and the first generated token."""
    from helpers.precision import BF16_LOGPROB_BOUND

    r0, r1 = _job(mp2_run, 0, f"mp2_{mode}"), _job(mp2_run, 1, f"mp2_{mode}")
    assert r0["dtype"] == r1["dtype"] == str(torch.bfloat16) and r0["model_parallel_size"] == 2
    for key in ("tokens_greedy", "tokens_sampled", "text_greedy", "text_greedy_echo"):
        assert r0[key] == r1[key], f"ranks disagree on {key}"
    rng = torch.get_rng_state()
    try:
        one = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH_SIZE,
                          device="cpu", dtype="bf16", quantize=mode)
    finally:
        torch.set_rng_state(rng)
    echoed = one.text_completion(PROMPTS, temperature=0.0, top_p=0.9, max_gen_len=MAX_GEN_LEN, logprobs=True,
                                 echo=True)
    worst = 0.0
    for text, got, ref in zip(PROMPTS, r0["text_greedy_echo"], echoed, strict=True):
        n_prompt = len(generator.tokenizer.encode(text, bos=True, eos=False))
        assert got["tokens"][:n_prompt] == ref["tokens"][:n_prompt]
        worst = max(worst, max(abs(a - b) for a, b in zip(got["logprobs"][1:n_prompt], ref["logprobs"][1:n_prompt])))
    assert worst < BF16_LOGPROB_BOUND
    # A quantized model really ran: its scores are not the float model's.
    float_scores = [c["logprobs"] for c in _job(mp2_run, 0, DEFAULT_DTYPE_JOB)["text_greedy_echo"]]
    assert [c["logprobs"] for c in r0["text_greedy_echo"]] != float_scores
