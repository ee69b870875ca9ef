"""lm-evaluation-harness against the server, scored item by item against the library.

    python -m venv /tmp/lmeval --system-site-packages && /tmp/lmeval/bin/pip install 'lm_eval[api]==0.4.13'
    /tmp/lmeval/bin/python benchmarks/lm_eval_check.py [--dtype fp32] [--items 40]

lm-eval is not a dependency of the project (it pulls in datasets, pandas, scikit-learn...), so
this is a check run by hand, not a test; the suite's tests/system/test_serve_clients.py sends
lm-eval's exact requests and reads them as lm-eval does.

It starts `python -m llama.serve` on the demo model, writes two small local tasks (a
multiple-choice one, scored by log-likelihood, and a generate-until one), and runs
  - `local-completions` (token-id prompts, as lm-eval sends by default) on both tasks, and
  - `local-chat-completions` (with the chat template) on the generation task,
then recomputes every item with the library in this process: each answer choice's
log-likelihood from `Llama.generate(..., echo=True, logprobs=True)` on the token ids lm-eval
made, and each generation from `text_completion` / `chat_completion` with the same stop
strings. Exits 1 when any item differs (log-likelihoods by more than 1e-4 in fp32, 0.05 in
bf16, where a batch's shape may round differently); writes
benchmarks/results/lm_eval_check-DTYPE.json.
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Rome", "Berlin"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("What colour is the sky on a clear day?", ["green", "red", "blue", "black"], 2),
    ("Which animal says moo?", ["a dog", "a cat", "a duck", "a cow"], 3),
    ("What is two plus two?", ["four", "five", "three", "twenty-two"], 0),
    ("Which planet do we live on?", ["Mars", "Earth", "Venus", "Jupiter"], 1),
    ("What do bees make?", ["milk", "silk", "honey", "wax paper"], 2),
    ("What is frozen water called?", ["steam", "sand", "glass", "ice"], 3),
]


def write_tasks(folder: Path, items: int) -> None:
    rows = [QUESTIONS[i % len(QUESTIONS)] for i in range(items)]
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a, "target": c[a]}) + "\n"
                            for q, c, a in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              f"doc_to_text: \"Question: {{{{question}}}}\\nAnswer:\"\n")
    (folder / "llama_mc.yaml").write_text(
        f"task: llama_mc\n{common}output_type: multiple_choice\ndoc_to_choice: \"{{{{choices}}}}\"\n"
        f"doc_to_target: \"{{{{answer}}}}\"\ntarget_delimiter: \" \"\nmetric_list:\n  - metric: acc\n")
    (folder / "llama_gen.yaml").write_text(
        f"task: llama_gen\n{common}output_type: generate_until\ndoc_to_target: \" {{{{target}}}}\"\n"
        f"generation_kwargs:\n  until: [\"\\n\", \"Question:\"]\n  max_gen_toks: 16\n  do_sample: false\n"
        f"  temperature: 0\nmetric_list:\n  - metric: exact_match\n")


def start_server(ckpt: str, dtype: str) -> "tuple[subprocess.Popen, str]":
    from serve_load import launch_server  # this script's folder is on sys.path

    return launch_server(["--ckpt_dir", ckpt, "--dtype", dtype, "--max_seq_len", "1024", "--max_batch_size", "8"])


def evaluate(model: str, model_args: str, tasks: list, folder: Path, chat: bool):
    """lm-eval's own run: (the LM object, {task: its logged samples})."""
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    lm = get_model(model).create_from_arg_string(model_args)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(folder)),
                          log_samples=True, apply_chat_template=chat, batch_size=4)
    return lm, out["samples"], out["results"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--items", type=int, default=24)
    args = parser.parse_args()

    import torch

    from llama import Llama
    from llama.checkpoint.demo import DEMO_NAME, ensure_demo
    from llama.utils.cpu import cpu_model

    ckpt = str(ensure_demo())
    proc, url = start_server(ckpt, args.dtype)
    failures, rows = [], {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            write_tasks(folder, args.items)
            common = f"model={DEMO_NAME},tokenizer_backend=huggingface,tokenizer={ckpt},max_retries=1,num_concurrent=4"
            lm, samples, results = evaluate("local-completions", f"base_url={url}/v1/completions,{common}",
                                            ["llama_mc", "llama_gen"], folder, chat=False)
            _, chat_samples, chat_results = evaluate(
                "local-chat-completions", f"base_url={url}/v1/chat/completions,{common},tokenized_requests=False",
                ["llama_gen"], folder, chat=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        library = Llama.build(ckpt, max_seq_len=1024, max_batch_size=8, dtype=args.dtype)
        tolerance = 1e-4 if args.dtype == "fp32" else 0.05
        worst = 0.0
        for sample in samples["llama_mc"]:
            for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
                context_ids, continuation_ids = lm._encode_pair(context, continuation)
                whole = context_ids + continuation_ids
                _, logprobs = library.generate([whole], max_gen_len=1, temperature=0, logprobs=True, echo=True)
                mine = sum(logprobs[0][len(context_ids): len(whole)])
                theirs = response[0][0]
                worst = max(worst, abs(mine - theirs))
                if abs(mine - theirs) > tolerance:
                    failures.append(f"llama_mc doc {sample['doc_id']} {continuation!r}: lm-eval {theirs} "
                                    f"library {mine}")
        generated = 0
        for name, logged, chat in (("completions", samples["llama_gen"], False),
                                   ("chat", chat_samples["llama_gen"], True)):
            for sample in logged:
                prompt, kwargs = sample["arguments"][0]
                stops = kwargs["until"]
                if chat:
                    # lm-eval logs a chat prompt as its JSON text (alone, or in a list of one)
                    text = prompt[0] if isinstance(prompt, (list, tuple)) else prompt
                    dialog = json.loads(text) if isinstance(text, str) else text
                    mine = library.chat_completion([dialog], temperature=0, max_gen_len=16, stop=stops[:4])
                    mine = mine[0]["generation"]["content"]
                else:
                    ids = lm.tok_encode(prompt)
                    tokens, _ = library.generate([ids], max_gen_len=16, temperature=0, stop=stops)
                    mine = library.tokenizer.decode(tokens[0])
                for stop in stops:  # lm-eval cuts its answers at these too
                    mine = mine.split(stop)[0]
                theirs = sample["resps"][0][0]
                generated += 1
                if mine.strip() != theirs.strip():
                    failures.append(f"llama_gen ({name}) doc {sample['doc_id']}: lm-eval {theirs!r} library {mine!r}")
        rows = {
            "date": time.strftime("%Y-%m-%d"), "machine": cpu_model() or platform.machine(),
            "dtype": args.dtype, "lm_eval": __import__("lm_eval").__version__,
            "loglikelihood_items": sum(len(s["arguments"]) for s in samples["llama_mc"]),
            "worst_loglikelihood_difference": worst, "generations_compared": generated,
            "acc_llama_mc": results["llama_mc"].get("acc,none"),
            "exact_match_completions": results["llama_gen"].get("exact_match,none"),
            "exact_match_chat": chat_results["llama_gen"].get("exact_match,none"),
            "failures": failures,
        }
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print("| check | value |\n|---|---|")
    for key, value in rows.items():
        if key != "failures":
            print(f"| {key} | {value} |")
    for failure in failures:
        print("MISMATCH", failure)
    out = ROOT / "benchmarks" / "results" / f"lm_eval_check-{args.dtype}.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if failures or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
