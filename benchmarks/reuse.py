"""Reusing work already done: prefix caching on against off, in one run on the demo model.

    python benchmarks/reuse.py [--runs 3] [--dtype bf16] [--cases chat,system,samples]

Cases (greedy, every engine the same token ids; the peer is our engine with
Llama.build(prefix_cache=False), in the same process, built the same way):
  chat     time to the first token at turn 8 of a chat (a system prompt, then 7 turns of 48
           generated tokens each; turn 8 is timed, the first 7 are replayed for every run)
  system   a 256-prompt batch (max_batch_size 8) whose prompts share a ~400-token system
           prompt, 16 tokens generated each: generated tokens per second
  samples  4 samples of one ~400-token prompt (the library's generate() with the prompt 4
           times, 64 tokens each, sampled) against one sample: the time ratio
  lookup   a rewrite task (correct the spelling of a ~150-word text: the answer repeats most
           of the prompt), greedy, up to 300 tokens, with Llama.build(prompt_lookup_num_tokens=
           --lookup_tokens, default 10 as in HF's examples) against without: generated tokens
           per second, the same text required
Prints a table with the ratios and writes benchmarks/results/reuse.json with the CPU model.
Exits non-zero if, in fp32, a case's tokens with reuse differ from those without (in bf16 the
rows that agree are counted and reported). Results of each dtype are kept side by side:
`--cases lookup --dtype fp32` after a bf16 run adds the exact check of prompt lookup.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch import cpu_info  # noqa: E402  (benchmarks/batch.py)

SYSTEM = ("You are a careful assistant for a small library. You answer questions about opening hours, "
          "borrowing rules, fines, reading rooms, printing, the catalogue and the events of the month. "
          "Keep answers short, polite and factual; when you do not know, say so and suggest asking at the "
          "front desk. ") * 6


def build(prefix_cache: bool, dtype: str, max_batch_size: int, **more):
    from llama import Llama
    from llama.demo import ensure_demo

    return Llama.build(str(ensure_demo(quiet=True)), max_seq_len=2048, max_batch_size=max_batch_size,
                       dtype=dtype, prefix_cache=prefix_cache, **more)


def chat_turn8(generator) -> tuple:
    """(seconds to the first token of turn 8, its tokens)."""
    dialog = [{"role": "system", "content": SYSTEM}]
    for turn in range(7):
        dialog.append({"role": "user", "content": f"Question {turn + 1}: tell me about the rule number {turn}."})
        dialog.append(generator.chat_completion([dialog], temperature=0, max_gen_len=48)[0]["generation"])
    dialog.append({"role": "user", "content": "And one last thing: when do you open on Sundays?"})
    start = time.perf_counter()
    out = generator.chat_completion([dialog], temperature=0, max_gen_len=1)[0]
    return time.perf_counter() - start, out["generation"]["content"]


def system_job(generator) -> tuple:
    """(generated tokens per second, the tokens) for 256 prompts sharing SYSTEM."""
    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}: is item {i} "
                f"available, and for how long may I borrow it?"}] for i in range(256)]
    tokens = [generator.formatter.encode_dialog_prompt(d) for d in prompts]
    start = time.perf_counter()
    out, _ = generator.generate(tokens, max_gen_len=16, temperature=0, stop_tokens=[])
    return sum(len(t) for t in out) / (time.perf_counter() - start), out


def samples(generator, n: int) -> tuple:
    """(seconds for n samples of one prompt, the tokens)."""
    prompt = generator.formatter.encode_dialog_prompt(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Write a notice about the new hours."}])
    start = time.perf_counter()
    out, _ = generator.generate([prompt] * n, max_gen_len=64, temperature=0.8, stop_tokens=[], seed=7)
    return time.perf_counter() - start, out


REWRITE = ("Correct the spelling in this text and give back the whole text, nothing else:\n\n"
           "The libary opens at nine in the morning from Monday to Friday, and at ten on Saturdays. On "
           "Sundays it is closed, exept during the exam weeks in January and June, when the reading rooms "
           "stay open from noon until eight in the evening. Books may be borrowed for three weeks and "
           "renewed twice, online or at the front desk, as long as nobody else has reserved them. Late "
           "returns cost twenty cents a day for each book, up to a maximum of five euros. Printing is "
           "available on the first floor; you need a library card with credit on it. The cataloge can be "
           "searched from any computer in the building or from home. Every month the library organises "
           "readings, workshops for children and a book club that meets on the last Thursday evening.")


def rewrite(generator) -> tuple:
    """(generated tokens per second, the tokens, tokens per drafted step) on REWRITE."""
    prompt = generator.formatter.encode_dialog_prompt([{"role": "user", "content": REWRITE}])
    start = time.perf_counter()
    out, _ = generator.generate([prompt], max_gen_len=300, temperature=0)
    return len(out[0]) / (time.perf_counter() - start), out[0], generator.last_stats.tokens_per_draft


def side_by_side(runs: int, on, off, case) -> tuple:
    """case(generator) -> (figure, output, ...) run `runs` times on each of the two generators,
    alternated (neither gets the other's warm caches): ({"on": figures, "off": figures}, medians
    (on, off), the last run's results of each)."""
    figures, last = {"on": [], "off": []}, {}
    for _ in range(runs):
        for name, generator in (("on", on), ("off", off)):
            last[name] = case(generator)
            figures[name].append(last[name][0])
    return figures, (statistics.median(figures["on"]), statistics.median(figures["off"])), last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--cases", default="chat,system,samples,lookup")
    parser.add_argument("--lookup_tokens", type=int, default=10)
    args = parser.parse_args()
    cases = args.cases.split(",")
    results, wrong = {}, []
    # Tokens must be equal in fp32; in bf16 other pass shapes may round a near-tie the other way
    # (counted and reported, as for batch mates: docs/batching.md).
    exact = args.dtype == "fp32"
    cached, plain = build(True, args.dtype, 8), build(False, args.dtype, 8)
    if "chat" in cases:
        times, (on, off), last = side_by_side(args.runs, cached, plain, chat_turn8)
        answers = {name: result[1] for name, result in last.items()}
        results["chat_turn8_ttft"] = {"on_s": on, "off_s": off, "speedup": off / on, "runs": times,
                                      "target": 5.0, "same_answer": answers["on"] == answers["off"]}
        if answers["on"] != answers["off"] and exact:
            wrong.append("chat")
    if "system" in cases:
        rates, (on, off), last = side_by_side(args.runs, cached, plain, system_job)
        outs = {name: result[1] for name, result in last.items()}
        same = sum(a == b for a, b in zip(outs["on"], outs["off"]))
        results["shared_system_prompt_256"] = {"on_tok_s": on, "off_tok_s": off, "speedup": on / off,
                                               "runs": rates, "target": 1.5, "same_rows": f"{same}/256"}
        if same < 256 and exact:
            wrong.append("system")
    if "samples" in cases:
        times = {"n4": [], "n1": [], "n4_off": []}
        for _ in range(args.runs):
            times["n1"].append(samples(cached, 1)[0])
            seconds, four = samples(cached, 4)
            times["n4"].append(seconds)
            seconds, four_off = samples(plain, 4)
            times["n4_off"].append(seconds)
            same_samples = sum(a == b for a, b in zip(four, four_off))
            if same_samples < 4 and exact:
                wrong.append("samples")
        n1, n4, n4_off = (statistics.median(times[k]) for k in ("n1", "n4", "n4_off"))
        results["n4_vs_one_sample"] = {"n1_s": n1, "n4_s": n4, "n4_off_s": n4_off, "cost": n4 / n1,
                                       "cost_off": n4_off / n1, "runs": times, "target": 1.5,
                                       "same_samples": f"{same_samples}/4"}
    if "lookup" in cases:
        drafting = build(True, args.dtype, 1, prompt_lookup_num_tokens=args.lookup_tokens)
        single = build(True, args.dtype, 1)
        rates, (on, off), last = side_by_side(args.runs, drafting, single, rewrite)
        (_, drafted, per_step), (_, plain_tokens, _) = last["on"], last["off"]
        results["prompt_lookup_rewrite"] = {"on_tok_s": on, "off_tok_s": off, "speedup": on / off, "runs": rates,
                                            "tokens": len(drafted), "tokens_per_drafted_step": per_step,
                                            "same_text": drafted == plain_tokens, "target": 1.5,
                                            "prompt_lookup_num_tokens": args.lookup_tokens,
                                            "first_difference": next((i for i, (a, b) in enumerate(
                                                zip(drafted, plain_tokens)) if a != b), None)}
        if drafted != plain_tokens and exact:
            wrong.append("lookup")
    machine = cpu_info()
    print(f"\nprefix caching on vs off, demo model (SmolLM2-135M-Instruct), {args.dtype}, median of {args.runs}, "
          f"{machine['cpu']}, {machine['cores']} cores\n")
    print(f"{'case':<30} {'on':>12} {'off':>12} {'ratio':>8} {'target':>8}")
    if "chat_turn8_ttft" in results:
        r = results["chat_turn8_ttft"]
        print(f"{'chat turn 8, first token':<30} {r['on_s'] * 1e3:>10.0f}ms {r['off_s'] * 1e3:>10.0f}ms "
              f"{r['speedup']:>7.1f}x {'>= 5x':>8}")
    if "shared_system_prompt_256" in results:
        r = results["shared_system_prompt_256"]
        print(f"{'256 prompts, shared system':<30} {r['on_tok_s']:>8.1f}tok/s {r['off_tok_s']:>8.1f}tok/s "
              f"{r['speedup']:>7.2f}x {'>= 1.5x':>8}")
    if "n4_vs_one_sample" in results:
        r = results["n4_vs_one_sample"]
        print(f"{'n=4 / one sample (time)':<30} {r['cost']:>11.2f}x {r['cost_off']:>11.2f}x "
              f"{'':>8} {'<= 1.5x':>8}")
    if "prompt_lookup_rewrite" in results:
        r = results["prompt_lookup_rewrite"]
        print(f"{'rewrite, prompt lookup (greedy)':<30} {r['on_tok_s']:>8.1f}tok/s {r['off_tok_s']:>8.1f}tok/s "
              f"{r['speedup']:>7.2f}x {'>= 1.5x':>8}   ({r['tokens_per_drafted_step']:.2f} tokens per drafted "
              f"step, same text: {r['same_text']}, first difference at token {r['first_difference']})")
    out = ROOT / "benchmarks" / "results" / "reuse.json"
    for result in results.values():
        result.update(date=time.strftime("%Y-%m-%d"), dtype=args.dtype)
    results = {f"{name}-{args.dtype}": result for name, result in results.items()}  # both dtypes kept
    # Cases run separately (--cases) add to the file; the machine must be the same.
    kept = json.loads(out.read_text()) if out.is_file() else {}
    machine = {**machine, "python": platform.python_version()}
    if kept.get("machine") != machine:
        kept = {}
    out.write_text(json.dumps({"machine": machine, "results": {**kept.get("results", {}), **results},
                               "mismatches": wrong}, indent=1))
    print(f"\nwrote {os.path.relpath(out)}")
    if wrong:
        print(f"error: prefix caching changed the tokens in: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
