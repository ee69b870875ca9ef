"""By-hand mutation testing of the engine's core (not part of CI: it takes tens of minutes).

Each named mutation is a small edit of one spot in llama/ (a textual replacement that must match
exactly once). For each, a scratch copy of the repository gets the edit, the test files that
guard that spot run there (`pytest -x`), and the result is recorded: "killed" when the tests
fail (or run past the time limit: a hang), "SURVIVED" when they all pass. Writes a markdown
table (default tests/MUTATIONS.md's "latest run" file, see --out).

    python tools/mutate.py                       # every mutation
    python tools/mutate.py --only budget-one-short,temperature-ignored
    python tools/mutate.py --list                # names, files, tests
    python tools/mutate.py --out /tmp/table.md   # where the table goes

Test files that do not exist (yet) are left out of a mutation's run, so the script also runs on
older checkouts (for a "before" table).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 900  # per mutation; a hang counts as killed

SAMPLING = ["tests/unit/test_sampling.py", "tests/unit/test_generation.py", "tests/unit/test_engine.py", "tests/parity/test_sampling_e2e.py"]
ENGINE = ["tests/unit/test_generation.py", "tests/unit/test_engine.py", "tests/parity/test_sampling_e2e.py"]
MODEL = ["tests/parity/test_hf_parity.py", "tests/unit/test_generation.py", "tests/unit/test_engine.py"]
LOADING = ["tests/unit/test_loading.py", "tests/unit/test_default_dtype.py"]
MP = ["tests/unit/test_loading.py", "tests/system/test_multiprocess.py", "tests/system/test_more_ranks.py"]
CHAT = ["tests/parity/test_llama3_e2e.py", "tests/parity/test_chat_format.py", "tests/unit/test_generation.py"]
DTYPE = ["tests/unit/test_default_dtype.py", "tests/unit/test_devices.py"]
INT8 = ["tests/unit/test_int8_kernel.py", "tests/unit/test_quantize.py", "tests/parity/test_precision.py"]
CONVERT = ["tests/unit/test_convert.py", "tests/parity/test_hf_parity.py"]


@dataclass
class Mutation:
    name: str
    path: str  # file under the repository
    edits: Sequence[Tuple[str, str]]  # (old, new); each old must occur exactly once
    tests: Sequence[str]
    why: str = ""  # what the mutant breaks
    equivalent: str = ""  # if it cannot be told apart from the original by its results: why
    needs: str = ""  # a native code path the CPU must run for its tests to reach the mutant (e.g. "amx")


M = Mutation
MUTATIONS: List[Mutation] = [
    # ---- the five survivors named in issue 16's review (reconstructed on today's code) -------
    M("budget-one-short", "llama/runtime/engine.py",
      [("params.max_seq_len - len(prompt))", "params.max_seq_len - len(prompt) - 1)")], ENGINE,
      "a request may generate one token fewer than max_seq_len leaves room for"),
    M("temperature-ignored", "llama/runtime/sampling.py",
      [("torch.softmax(shifted / t, dim=-1)", "torch.softmax(shifted, dim=-1)")], SAMPLING,
      "softmax(logits) whatever the temperature"),
    M("temperature-ignored-in-engine", "llama/runtime/engine.py",
      [("torch.tensor([r.temperature for r in requests]", "torch.tensor([float(r.temperature > 0) for r in requests]")],
      SAMPLING,
      "the engine hands the sampler 1.0 for every sampled row"),
    M("cpu-default-fp16", "llama/runtime/devices.py",
      [("return torch.bfloat16 if cpu_has_native_bf16() else torch.float32",
        "return torch.float16 if cpu_has_native_bf16() else torch.float32")], DTYPE,
      "the CPU default dtype bf16 -> fp16"),
    M("int8-fused-2x-scale", "llama/model/quantize/int8.py",
      [("_weight_int8pack_mm(flat, self.q, self.scale)", "_weight_int8pack_mm(flat, self.q, self.scale * 2)")],
      INT8, "the fused int8 decode kernel given twice the scale"),
    M("gguf-gate-up-swapped", "llama/checkpoint/convert/gguf.py",
      [('"ffn_gate": "feed_forward.w1"', '"ffn_gate": "feed_forward.w3"'),
       ('"ffn_up": "feed_forward.w3"', '"ffn_up": "feed_forward.w1"')], CONVERT,
      "GGUF ffn_gate/ffn_up tensors swapped"),
    # ---- sampling ---------------------------------------------------------------------------
    M("nucleus-one-short", "llama/runtime/sampling.py",
      [("mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs",
        "mass_before = torch.cumsum(sorted_probs, dim=-1)")], SAMPLING, "the token that crosses top_p is left out"),
    M("nucleus-first-not-forced", "llama/runtime/sampling.py",
      [("member[:, 0] = True", "member[:, 0] = member[:, 0]")], SAMPLING, "a tiny top_p keeps no token"),
    M("race-sign", "llama/runtime/sampling.py",
      [("torch.log(probs) - torch.log(noise)", "torch.log(probs) + torch.log(noise)")], SAMPLING,
      "the exponential race run backwards"),
    M("noise-ignores-token", "llama/runtime/sampling.py",
      [("row_seeds(keys, steps).unsqueeze(1) ^ token_ids)", "row_seeds(keys, steps).unsqueeze(1) + 0 * token_ids)")],
      SAMPLING, "one uniform for all tokens of a row: always the argmax"),
    M("noise-ignores-step", "llama/runtime/sampling.py",
      [("^ (steps & _MASK32))", ")")], SAMPLING, "the same noise at every step of a request"),
    M("noise-ignores-key-high-bits", "llama/runtime/sampling.py",
      [("_hash32(_hash32(low) ^ high)", "_hash32(_hash32(low))")], SAMPLING,
      "keys that differ only in their high 32 bits sample alike"),
    M("hash-mask-wrong", "llama/runtime/sampling.py", [("high &= 0xFFFF\n", "high &= 0xFFFFF\n")], SAMPLING,
      "the split multiply keeps 4 more bits", equivalent="the extra bits are shifted to bits 32-35, which "
      "the final & 0xFFFFFFFF removes: the same hash"),
    M("hash-shift-wrong", "llama/runtime/sampling.py", [("high <<= 16", "high <<= 15")], SAMPLING,
      "the split multiply is not (x * c) mod 2^32"),
    M("hot-threshold", "llama/runtime/sampling.py", [("hot = temperature > 0", "hot = temperature > 1")], SAMPLING,
      "temperatures up to 1 decode greedily"),
    M("engine-step-counter-zero", "llama/runtime/engine.py",
      [("self._tensor([len(h.tokens) for h in batch]), min_p, top_k)", "self._tensor([0 for h in batch]), min_p, top_k)")],
      SAMPLING,
      "every step of a request samples with step 0's noise"),
    M("same-key-for-every-prompt", "llama/generation.py",
      [("return [request_key(call, i) for i in range(count)]", "return [request_key(call, 0) for i in range(count)]")],
      SAMPLING, "all prompts of a call share one key"),
    M("global-rng-unused", "llama/runtime/sampling.py",
      [("return int(torch.randint(0, 2**62, (1,)).item())", "return 12345")], SAMPLING,
      "successive calls sample alike"),
    M("greedy-temperature-draws", "llama/generation.py",
      [("random_key() if temperature > 0 else 0", "random_key()")], SAMPLING,
      "greedy calls consume the global RNG (Meta's draw nothing)"),
    # ---- budget, stop tokens, the scheduler's slots -----------------------------------------------
    M("budget-one-long", "llama/runtime/engine.py",
      [("if len(handle.tokens) >= handle.budget:", "if len(handle.tokens) > handle.budget:")], ENGINE,
      "one token past max_gen_len"),
    M("budget-ignores-max-gen-len", "llama/runtime/engine.py",
      [("min(max_gen_len, params.max_seq_len - len(prompt))", "(params.max_seq_len - len(prompt))")], ENGINE,
      "max_gen_len not applied"),
    M("stop-tokens-ignored", "llama/runtime/engine.py",
      [("if token in handle._stops:", "if token in handle._stops and False:")], ENGINE + CHAT,
      "generation runs past a stop token"),
    M("stop-token-kept", "llama/runtime/engine.py",
      [('self._finish(handle, "stop", events, logprob=logprob, top=top, stop_token=token)',
        'handle.tokens.append(token); self._finish(handle, "stop", events, logprob=logprob, top=top, stop_token=token)')],
      ENGINE + CHAT, "the stop token is returned with the text"),
    M("eot-not-a-stop-token", "llama/tokenizer.py",
      [('END_MARKERS = ("<|eot_id|>", ', 'END_MARKERS = (')], CHAT, "Llama 3 runs past <|eot_id|>"),
    M("slot-not-freed", "llama/runtime/engine.py",
      [("            self.rows[handle.row] = None\n", "            pass\n")], ENGINE,
      "a finished request keeps its row"),
    M("decode-position-off-by-one", "llama/runtime/engine.py",
      [("len(h.request.prompt_tokens) + len(h.tokens) - 1 for h in batch}",
        "len(h.request.prompt_tokens) + len(h.tokens) for h in batch}")], ENGINE, "decode writes one slot late"),
    M("chunked-prefill-from-zero", "llama/runtime/engine.py",
      [("starts = [h.prefilled for h in batch]", "starts = [0 for h in batch]")], ENGINE,
      "every prompt chunk is placed at position 0"),
    M("decode-wrong-logit-rows", "llama/runtime/engine.py",
      [("logits = logits[self._tensor([h.row for h in batch])] if len(batch) < len(computed) else logits",
        "logits = logits[: len(batch)]")], ENGINE, "rows with gaps take their neighbours' logits"),
    M("admit-highest-row-first", "llama/runtime/engine.py",
      [("return free[0], free[0], 0  # the lowest: keeps the busy rows a prefix",
        "return free[-1], free[-1], 0  # the lowest: keeps the busy rows a prefix")], ENGINE,
      "busy rows no longer a prefix", equivalent="results are the same by design (rows never see each "
      "other); only the rows a decode pass computes grow (EngineStats)"),
    # ---- positions, rotary, attention ----------------------------------------------------------
    M("rope-theta-ignored", "llama/model/rotary.py",
      [("1.0 / (args.rope_theta ** ", "1.0 / (10000.0 ** ")], MODEL + ["tests/parity/test_infilling.py"],
      "rope_theta from params.json unused"),
    M("rotary-halves-layout", "llama/model/rotary.py",
      [("pairs = x.float().unflatten(-1, (-1, 2))", "pairs = x.float().unflatten(-1, (2, -1)).transpose(-1, -2)")],
      MODEL, "HF's rotate-half pairs instead of Meta's interleaved ones"),
    M("positions-ignore-start", "llama/model/transformer.py",
      [("positions = (start_pos + offsets).expand(batch, seqlen)", "positions = offsets.expand(batch, seqlen)")],
      MODEL, "every call starts at position 0"),
    M("mask-excludes-self", "llama/model/transformer.py",
      [("(cached <= positions.unsqueeze(-1))", "(cached < positions.unsqueeze(-1))")], MODEL,
      "a query cannot see its own key"),
    M("mask-dropped-for-ragged-decode", "llama/model/transformer.py",
      [("return seqlen == 1 and bool((start_pos == kv_len - 1).all())", "return seqlen == 1")], MODEL,
      "rows at different positions read stale slots"),
    M("llama31-scaling-off", "llama/model/rotary.py",
      [("freqs = _llama31_scale(freqs, args)", "freqs = freqs")], MODEL, "use_scaled_rope ignored"),
    M("swiglu-gate-up-swapped", "llama/model/transformer.py",
      [("gate, up = self.w1(x), self.w3(x)", "gate, up = self.w3(x), self.w1(x)")], MODEL,
      "silu on the up projection"),
    M("rmsnorm-eps", "llama/model/transformer.py", [("eps=self.eps)", "eps=1e-2)")], MODEL, "norm_eps unused"),
    M("cache-rows-ignored", "llama/model/cache.py",
      [("else (self.k[rows, :kv_len], self.v[rows, :kv_len])",
        "else (self.k[: k.shape[0], :kv_len], self.v[: k.shape[0], :kv_len])")], MODEL,
      "a scheduler's rows read rows 0..B-1"),
    M("gqa-fold-mask-order", "llama/model/attention.py",
      [("attn_mask=mask.repeat(1, 1, groups, 1))", "attn_mask=mask.repeat_interleave(groups, dim=2))")],
      MODEL + ["tests/unit/test_accelerator_paths.py"], "the folded GQA mask in the wrong row order (accelerators)"),
    # ---- shard axes, resharding offsets, collectives -----------------------------------------------
    M("shard-axis-w3-as-row", "llama/checkpoint/layout.py",
      [('_COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3")', '_COLUMN_PARALLEL = ("wq", "wk", "wv", "w1")'),
       ('_ROW_PARALLEL = ("wo", "w2")', '_ROW_PARALLEL = ("wo", "w2", "w3")')], MP, "w3 split on the wrong axis"),
    M("embedding-axis-llama3-as-llama2", "llama/checkpoint/layout.py",
      [("return 0 if vocab_parallel_embedding else 1", "return 1 if vocab_parallel_embedding else 1")], MP,
      "Llama 3's vocabulary-split embedding cut on the dim"),
    M("narrow-offset-zero", "llama/checkpoint/shards.py",
      [("piece.narrow(axis, lo - i * size, hi - lo)", "piece.narrow(axis, 0, hi - lo)")], MP,
      "N -> M resharding reads the start of each shard"),
    M("join-offset-zero", "llama/checkpoint/shards.py",
      [("lo - mp_rank * shape[axis]))", "0))")], MP, "joined parts all written at offset 0"),
    M("gather-order-reversed", "llama/model/parallel.py",
      [("return torch.cat(parts, dim=-1)", "return torch.cat(parts[::-1], dim=-1)")], MP,
      "the ranks' column parts gathered in the wrong order"),
    M("vocab-embedding-no-offset", "llama/model/parallel.py",
      [("F.embedding((tokens - self.start).masked_fill(elsewhere, 0), self.weight)",
        "F.embedding(tokens.masked_fill(elsewhere, 0), self.weight)")], MP + ["tests/parity/test_llama3_e2e.py"],
      "vocabulary-parallel ranks look up global ids in their local rows"),
    # ---- dtype choice ----------------------------------------------------------------------------
    M("cpu-bf16-flag-missed", "llama/runtime/devices.py",
      [('& {"avx512_bf16", "amx_bf16", "bf16"}', '& {"amx_bf16", "bf16"}')], DTYPE,
      "AVX512-BF16 CPUs get fp32"),
    M("llama-dtype-env-ignored", "llama/runtime/devices.py",
      [('dtype = settings.get("LLAMA_DTYPE")', 'dtype = None')], DTYPE + ["tests/unit/test_loading.py"],
      "LLAMA_DTYPE unused"),
    M("mps-gets-bf16", "llama/runtime/devices.py",
      [('    if device.type == "mps":\n        return torch.float16', '    if device.type == "mps":\n        return torch.bfloat16')],
      DTYPE, "MPS default dtype"),
    # ---- chat templates ----------------------------------------------------------------------------
    M("llama2-sys-tags-swapped", "llama/chat_format.py",
      [('merged = self.B_SYS + dialog[0]["content"] + self.E_SYS', 'merged = self.E_SYS + dialog[0]["content"] + self.B_SYS')],
      CHAT, "<<SYS>> block written backwards"),
    M("llama2-answer-no-eos", "llama/chat_format.py",
      [("tokens += self.tokenizer.encode(text, bos=True, eos=True)", "tokens += self.tokenizer.encode(text, bos=True, eos=False)")],
      CHAT, "a past exchange not closed by EOS"),
    M("llama3-content-not-stripped", "llama/chat_format.py",
      [('self._text((msg["content"] or "").strip())', 'self._text(msg["content"] or "")')], CHAT,
      "Llama 3 keeps surrounding spaces"),
    M("llama3-tool-role-kept", "llama/chat_format.py",
      [('role = "ipython" if role == "tool" else role', "role = role")], CHAT, "tool written as 'tool', not 'ipython'"),
    M("chatml-no-newline-after-end", "llama/chat_format.py",
      [('tokens += [self.im_end] + self._text("\\n")', "tokens += [self.im_end]")], CHAT, "ChatML loses its newline"),
    # ---- int8 scales ---------------------------------------------------------------------------------
    M("int8-dequant-2x-scale", "llama/model/quantize/int8.py",
      [("out = F.linear(x, self.q.to(x.dtype)) * self.scale", "out = F.linear(x, self.q.to(x.dtype)) * self.scale * 2")],
      INT8, "the prefill (dequantize) path given twice the scale"),
    M("int8-absmax-positive-only", "llama/model/quantize/int8.py",
      [("torch.maximum(-low, high) / 127", "high.clamp(min=0) / 127")], INT8,
      "scale from the largest positive value only: negative outliers clipped"),
    M("int8-fused-never", "llama/model/quantize/int8.py",
      [("if self.fused and flat.shape[0] <= FUSED_MAX_ROWS:", "if False:")], INT8,
      "the fused kernel never runs (equal results, slower)"),
    # ---- conversion ---------------------------------------------------------------------------------
    M("hf-rotary-not-unpermuted", "llama/checkpoint/convert/hf.py",
      [("weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)",
        "weight.reshape(rows, cols)")], CONVERT, "HF q/k kept in rotate-half order"),
    # ---- found by the GPU run and the Intel AMX machine (2026-12-04) --------------------------------
    M("folded-output-viewed", "llama/model/attention.py",
      [("return out.reshape(batch, heads, seqlen, dim)", "return out.view(batch, heads, seqlen, dim)")],
      ["tests/unit/test_accelerator_paths.py"], "the folded form's strided CUDA output viewed (crashed on an H200)"),
    M("grouped-mask-probe-ignored", "llama/model/attention.py",
      [("if heads == kv_heads or grouped_mask_kernel(q):",
        "if heads == kv_heads or attention_device_type(q) == \"cpu\":")],
      ["tests/unit/test_accelerator_paths.py"], "CUDA folds even where an efficient kernel takes the mask as it is"),
    M("prompt-attention-on-later-chunks", "llama/model/transformer.py",
      [("if fresh and seqlen > 1 and self.prompt_attention_dtype is not None:",
        "if seqlen > 1 and self.prompt_attention_dtype is not None:")],
      ["tests/unit/test_prompt_attention.py"], "prompt chunks that read the fp32 cache attend in bf16 too"),
    M("verdicts-not-kept", "llama/utils/measurements.py",
      [("if again or any(name not in entries for name, _ in names.values()):", "if True:"),
       ("names.items() if again or name not in entries]", "names.items()]")],
      ["tests/unit/test_prompt_attention.py", "tests/unit/test_decode_backend.py"],
      "each process times anew: a server and a script may choose differently"),
    M("verdicts-measured-at-once", "llama/utils/measurements.py",
      [("with first_use_work(), hold(path, what, quiet=True):", "with first_use_work(), contextlib.nullcontext():")],
      ["tests/unit/test_prompt_attention.py", "tests/unit/test_decode_backend.py"],
      "ranks starting together each time and may choose differently"),
    M("prompt-attention-no-margin", "llama/runtime/backend.py",
      [("model_ms < PROMPT_ATTENTION_MARGIN * cache_ms", "model_ms < cache_ms")],
      ["tests/unit/test_prompt_attention.py"], "bf16 prompt attention chosen at a near tie (flip-flops)"),
    M("amx-pairs-swapped", "llama/native/csrc/linear_amx.cpp",
      [("xp + kp * c.mpad + mb * TILE_ROWS,", "xp + (kp ^ 1) * c.mpad + mb * TILE_ROWS,")],
      ["tests/unit/test_native.py"], "x's column pairs packed out of order for the tile unit", needs="amx"),
    M("amx-second-rows-block-dropped", "llama/native/csrc/linear_amx.cpp",
      [("            _tile_dpbf16ps(3, 5, 7);\n", "")],
      ["tests/unit/test_native.py"], "rows 17-32 of x miss half the weight rows on the tile unit", needs="amx"),
    M("amx-tail-rows-skipped", "llama/native/csrc/linear_amx.cpp",
      [("    if (end > full) tail_rows(c, full * UNIT_ROWS);", "")],
      ["tests/unit/test_native.py"], "the last N % 32 weight rows never computed", needs="amx"),
    M("attention-group-wrong-kv-head", "llama/native/csrc/decode.cpp",
      [("C* kv = ks + (h0 + g) / group * hd;", "C* kv = ks + (h0 + g) % m.n_kv_heads * hd;")],
      ["tests/unit/test_native.py"], "grouped query heads read another KV head's cache"),
    M("decode-path-verdict-ignored", "llama/runtime/backend.py",
      [("decoder = self.decoders.get(self._verdict(tokens.numel())) or next(iter(self.decoders.values()))",
        "decoder = next(iter(self.decoders.values()))")],
      ["tests/unit/test_decode_backend.py"], "the native path that measured fastest is not the one that runs"),
    # ---- the architecture round (issue 23): the mechanisms it made one ------------------------
    M("token-text-without-context", "llama/detokenize.py",
      [("    before = list(before[-CONTEXT_TOKENS:])\n", "    before = []\n")],
      ["tests/unit/test_batch.py", "tests/system/test_serve.py"],
      "a token's text decoded alone: sentencepiece drops its leading space, the texts no longer join"),
    M("quantized-product-skips-the-collective", "llama/model/parallel.py",
      [("            return self.combine(self.kernel(x))", "            return self.kernel(x)")],
      ["tests/system/test_multiprocess.py", "tests/parity/test_precision.py"],
      "a quantized layer's partial sums are never joined across ranks"),
    M("blocks-width-unchecked", "llama/model/quantize/blocks.py",
      [("if layer.weight.shape[1] % BLOCK]", "if False]")], ["tests/unit/test_decode_backend.py"],
      "a rank's slice that is not 32 wide is not refused by name"),
    M("import-check-module-level-only", "tests/unit/test_architecture.py",
      [("for node in ast.walk(ast.parse(path.read_text())):", "for node in ast.parse(path.read_text()).body:")],
      ["tests/unit/test_architecture.py"], "imports inside functions escape the dependency table"),
    M("model-flag-defaults-ignored", "llama/cli.py",
      [("given = {**flags.__dict__, **{k: v", "given = {**ModelFlags().__dict__, **{k: v")],
      ["tests/unit/test_cli.py"], "a command's own defaults (chat's max_seq_len 2048) are not applied"),
    M("setting-default-changed", "llama/settings.py",
      [('Setting("LLAMA_DIST_TIMEOUT", "300"', 'Setting("LLAMA_DIST_TIMEOUT", "30"')],
      ["tests/system/test_docs.py", "tests/unit/test_devices.py"],
      "the registry's default and the documented one differ (waits bounded at 30 s, not 300)"),
    # ---- server round 2 (issue 24): clients, fields, tools, production behaviour --------------
    M("socket-not-named-tcp", "llama/serve/__main__.py",
      [("socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)", "socket.socket(family, socket.SOCK_STREAM)"),
       ("        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n", "")],
      ["tests/system/test_serve_clients.py"], "Nagle's algorithm holds each small answer on a reused connection"),
    M("stop-token-position-dropped", "llama/serve/app.py",
      [("if update.stop_token is not None and job.echo and job.logprobs:", "if False:")],
      ["tests/system/test_serve_clients.py"],
      "lm-eval's scoring drops the continuation's last token when the model would stop there"),
    M("prompt-alternatives-missing", "llama/runtime/engine.py",
      [("[[]] if request.prompt_logprobs and request.top_logprobs else None", "None")],
      ["tests/system/test_serve_clients.py", "tests/system/test_serve.py"],
      "prompt tokens have no top_logprobs: lm-eval's parse fails on null"),
    M("refused-field-ignored", "llama/serve/protocol.py",
      [("if status == REFUSED and body[name] is not None:", "if False:")],
      ["tests/system/test_serve_clients.py"], "a field the server does not implement is silently ignored"),
    M("connection-cap-off-by-many", "llama/serve/connections.py",
      [("if len(self.connections) > self.max_connections:", "if len(self.connections) > 2 * self.max_connections:")],
      ["tests/system/test_serve_production.py"], "connections over --max_connections are kept open"),
    M("half-sent-head-kept", "llama/serve/connections.py",
      [("waiting = self.cycle is None or self.cycle.response_complete", "waiting = False")],
      ["tests/system/test_serve_production.py"], "a connection that never finishes its request head holds forever"),
    M("drain-without-error-shape", "llama/serve/app.py",
      [("if isinstance(update.error, ShuttingDown):", "if False:")],
      ["tests/system/test_serve_production.py"], "requests cut by a shutdown get a 500, not a 503 to retry"),
    M("tool-call-of-unoffered-function", "llama/serve/app.py",
      [('if call is not None and call["tool_name"] in job.tools:', "if call is not None:")],
      ["tests/system/test_serve_tools.py"], "text that parses as a call of a function not offered becomes a call"),
    M("tool-call-history-ends-eot", "llama/chat_format.py",
      [('tokens.append(self._special("<|eom_id|>" if calls else "<|eot_id|>"))',
        'tokens.append(self._special("<|eot_id|>"))')],
      ["tests/parity/test_tool_calls.py"], "a past call is not ended with <|eom_id|> as llama-models writes it"),
    M("detokenizer-window-never-moves", "llama/detokenize.py",
      [("self._window = (read, len(self.ids))", "self._window = (begin, len(self.ids))")],
      ["tests/unit/test_unicode.py", "tests/system/test_serve.py"],
      "each token re-decodes everything since the start: quadratic time in the answer's length"),
    M("api-key-padding-accepted", "llama/settings.py",
      [('else "has spaces around it" if key != key.strip()', 'else "has spaces around it" if False')],
      ["tests/system/test_serve_production.py"], "a key no client can send starts a server no one can use"),
    # Reuse (issue 26): prefix caching, n, speculative decoding, best_of.
    M("prefix-content-misses-decoded-tokens", "llama/runtime/engine.py",
      [("            self._content[handle.row].append(handle.tokens[-1])", "            pass")],
      ["tests/unit/test_prefix_cache.py"],
      "a row's cached prefix forgets the tokens it decoded: a later turn re-prefills the answer"),
    M("free-row-rides-at-position-0", "llama/runtime/engine.py",
      [("else self.params.max_seq_len - 1 for h in self.rows]", "else 0 for h in self.rows]")],
      ["tests/unit/test_prefix_cache.py"], "a free row riding along in a decode pass overwrites its cached prefix"),
    M("siblings-do-not-wait", "llama/runtime/engine.py",
      [("        if coming >= match[source] + MIN_SHARED_PREFIX:", "        if False:")],
      ["tests/unit/test_prefix_cache.py"], "n copies of a prompt are each prefilled"),
    M("prefix-not-copied", "llama/runtime/engine.py",
      [("                    cache.k[row, :reused] = cache.k[source, :reused]", "                    pass")],
      ["tests/unit/test_prefix_cache.py"], "a reused prefix is taken from another row without its keys"),
    M("outside-writes-unnoticed", "llama/model/cache.py", [("        self.writes += 1", "        pass")],
      ["tests/unit/test_prefix_cache.py"], "Meta's own loop on generator.model leaves the engine trusting stale rows"),
    M("draft-accepted-unchecked", "llama/runtime/engine.py",
      [("            accepted = next((j for j, token in enumerate(feed[1:]) if chosen[j] != token), len(feed) - 1)",
        "            accepted = len(feed) - 1")],
      ["tests/unit/test_prompt_lookup.py"], "every draft token is kept, whatever the model says"),
    M("draft-content-takes-rejected-tokens", "llama/runtime/engine.py",
      [("            self._content[handle.row].extend(feed[: accepted + 1])",
        "            self._content[handle.row].extend(feed)")],
      ["tests/unit/test_prompt_lookup.py"],
      "the cache bookkeeping counts rejected draft tokens: later reuse is misaligned"),
    M("draft-steps-not-advanced", "llama/runtime/engine.py",
      [("        steps = [len(batch[i].tokens) + j for i in drafting",
        "        steps = [len(batch[i].tokens) for i in drafting")],
      ["tests/unit/test_prompt_lookup.py"], "a sampled draft position draws with the wrong step: other samples than "
      "decoding one at a time"),
    M("verify-pass-on-pytorch-gemm", "llama/runtime/engine.py",
      [("        with measured_small_products():  # a few rows", "        with torch.no_grad():  # a few rows")],
      ["tests/unit/test_prompt_lookup.py"], "the verifying pass reads the weights at PyTorch's few-row GEMM speed "
      "(3x slower here)"),
    M("best-of-worst-first", "llama/serve/app.py",
      [("sorted(group, key=lambda i: -scores[i])", "sorted(group, key=lambda i: scores[i])")],
      ["tests/system/test_serve.py"], "best_of answers the worst samples"),
    # GPU work testable on the CPU (issue 25): the fixed-shape step, fusion, memory sizing.
    M("static-step-reads-host", "llama/runtime/static_step.py",
      [("kv_len=length, static=True)", "kv_len=length)")],
      ["tests/unit/test_static_decode.py"], "the captured step reads positions on the host (a sync per step; "
      "capture fails)"),
    M("unsettled-rows-kept", "llama/runtime/engine.py",
      [("            if out.finite and out.settled:", "            if out.finite:")],
      ["tests/unit/test_static_decode.py"], "a row whose nucleus reaches past the step's candidates keeps a "
      "token from a truncated nucleus"),
    M("fixed-sampler-greedy-for-all", "llama/runtime/sampling.py",
      [("    tokens = torch.where(raced, race(ids, values, member, keys, steps), greedy)",
        "    tokens = greedy")],
      ["tests/unit/test_static_decode.py"], "sampled rows of the fixed-shape step decode greedily"),
    M("fused-qkv-split-swapped", "llama/model/transformer.py",
      [("split((q_dim, kv_dim, kv_dim), dim=-1)", "split((q_dim, kv_dim, kv_dim), dim=-1)[::-1]")],
      ["tests/unit/test_fused_projections.py"], "the fused product's parts are taken in the wrong order"),
    M("prefill-budget-ignored", "llama/runtime/engine.py",
      [("            if count and max(width, len(chunk)) * (count + 1) > budget:", "            if False:")],
      ["tests/unit/test_memory_sizing.py"], "a prefill pass of many rows outgrows the activations a build "
      "left room for"),
    M("sizing-forgets-activations", "llama/runtime/memory.py",
      [("    room = int(fraction * total) - in_use - activations", "    room = int(fraction * total) - in_use")],
      ["tests/unit/test_memory_sizing.py"], "gpu_memory_fraction gives the cache the activations' memory: "
      "out of memory at the first long prefill"),
    M("int8-on-cuda-allowed", "llama/model/quantize/int8.py",
      [('    if device.type == "cuda":\n        raise', '    if False:\n        raise')],
      ["tests/unit/test_quantize.py"], "int8 runs on CUDA, slower than bf16"),
    # CPU performance round 3 (issue 28): interleaved quantized weights, the native prompt attention.
    M("interleave-q8-sign-kept", "llama/native/csrc/quant.cpp",
      [("    const uint8_t flip = base == Q8_0 ? 0x80 : 0;", "    const uint8_t flip = 0;")],
      ["tests/unit/test_native.py"], "q8_0x16 keeps int8 q where the kernel reads q + 128"),
    M("interleaved-q4-halves-swapped", "llama/native/csrc/linear_avx512.cpp",
      [("_mm512_set1_epi32(xw[r][8 * b + 4 + c])", "_mm512_set1_epi32(xw[r][8 * b + c + 0])")],
      ["tests/unit/test_native.py"], "the high nibbles of a q4 block meet the wrong activations"),
    M("interleaved-state-dict-raw", "llama/native/__init__.py",
      [('        destination[prefix + "packed"] = self.blocks()', '        destination[prefix + "packed"] = self.packed')],
      ["tests/unit/test_native.py"], "a saved quantized layer holds the interleaved bytes, not GGML's blocks"),
    M("attention-diagonal-hidden", "llama/native/csrc/attention_avx512_bf16.cpp",
      [("_mm512_cmple_epi32_mask(", "_mm512_cmplt_epi32_mask(")],
      ["tests/unit/test_native_attention.py"], "a query does not see its own key"),
    M("attention-rescale-skipped", "llama/native/csrc/attention_avx512_bf16.cpp",
      [("            if (alpha != 1.0f)", "            if (false)")],
      ["tests/unit/test_native_attention.py"], "the online softmax forgets to rescale the output of earlier blocks"),
    M("plain-form-wins-ties", "llama/native/kernel_choice.py",
      [("times[0] < PLAIN_FORM_MARGIN * times[1]", "times[0] < times[1]")],
      ["tests/unit/test_native.py"], "a noisy near tie at one row keeps a weight in the slower plain form"),
    M("decode-tie-goes-to-torch", "llama/runtime/backend.py",
      [('ms["torch"] < TORCH_STEP_MARGIN * natives[fastest]', 'ms["torch"] < natives[fastest]')],
      ["tests/unit/test_decode_backend.py"], "a near tie in a busy moment keeps PyTorch's slower step for good"),
    M("dequant-q8x16-sign-kept", "llama/native/csrc/linear_avx512.cpp",
      [("_mm256_set1_epi8((char)0x80));  // q + 128 -> q", "_mm256_set1_epi8(0));  // q + 128 -> q")],
      ["tests/unit/test_native.py"], "prefill reads an interleaved q8_0 weight 128 off in every element"),
    M("dequant-scalar-q4-high-off", "llama/native/csrc/quant.cpp",
      [("o[j + 16] = (float)((blk->qs[j] >> 4) - 8) * d;", "o[j + 16] = (float)((blk->qs[j] >> 4) - 7) * d;")],
      ["tests/unit/test_native.py"], "machines without AVX-512 dequantize q4_0's high nibbles wrongly"),
    M("native-prompt-attention-never-runs", "llama/model/transformer.py",
      [("            if self.prompt_attention_native:", "            if False:")],
      ["tests/unit/test_native_attention.py"], "the measured native attention is never used"),
    # CPU performance round 3, later (issue 28 item 3): the bf16 KV cache and its decode kernel.
    M("bf16-cache-values-dims-swapped", "llama/native/csrc/attention_avx512_bf16.cpp",
      [("a.out[g * hd + c + 8 * (lane / 4) + 4 * half + lane % 4]", "a.out[g * hd + c + 8 * (lane / 4) + 4 * (1 - half) + lane % 4]")],
      ["tests/unit/test_kv_cache.py"], "the interleaved value accumulators are put back in the wrong dims", needs="avx512_bf16"),
    M("bf16-cache-pairs-crossed", "llama/native/csrc/attention_avx512_bf16.cpp",
      [("pairs_of[2 * c] = as_bh(_mm512_unpacklo_epi16(x, y));", "pairs_of[2 * c] = as_bh(_mm512_unpacklo_epi16(y, x));")],
      ["tests/unit/test_kv_cache.py"], "position s's value meets position s+1's probability", needs="avx512_bf16"),
    M("bf16-cache-one-kv-head", "llama/native/csrc/attention_avx512_bf16.cpp",
      [("row[r] = a.keys + (s0 + std::min<int64_t>(r, n - 1)) * stride + kvh * hd;",
        "row[r] = a.keys + (s0 + std::min<int64_t>(r, n - 1)) * stride + first_kv * hd;")],
      ["tests/unit/test_kv_cache.py"], "every query head scores against the first key head", needs="avx512_bf16"),
    M("bf16-cache-sum-tree-crossed", "llama/native/csrc/attention_avx512_bf16.cpp",
      [("_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0))",
        "_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(0, 1, 1, 0))")],
      ["tests/unit/test_kv_cache.py"], "the 16-position sum tree mixes two positions' scores", needs="avx512_bf16"),
    M("bf16-cache-stored-unrounded", "llama/native/csrc/decode.cpp",
      [("inline void cache_store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }",
        "inline void cache_store(uint16_t* p, int64_t i, float v) { p[i] = (uint16_t)(f32_to_bits(v) >> 16); }")],
      ["tests/unit/test_kv_cache.py"], "the native step truncates keys and values into the cache, PyTorch rounds them"),
    M("bf16-cache-setting-ignored", "llama/model/cache.py",
      [('    if chosen != "auto":', '    if False:')],
      ["tests/unit/test_kv_cache.py"], "LLAMA_KV_CACHE=bf16 keeps an fp32 cache"),
    # ... and the fused bf16 elementwise passes of prefill (item 2).
    M("fused-swiglu-silu-on-up", "llama/native/csrc/elementwise_avx512.cpp",
      [("const uint16_t *g = gate + r * gate_stride, *u = up + r * up_stride;",
        "const uint16_t *u = gate + r * gate_stride, *g = up + r * up_stride;")],
      ["tests/unit/test_native_elementwise.py"], "SiLU of the up projection times the gate", needs="avx512"),
    M("fused-norm-rounding-skipped", "llama/native/csrc/elementwise_avx512.cpp",
      [("const float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(hr[i]) * inv));",
        "const float normed = bf16_to_f32(hr[i]) * inv;")],
      ["tests/unit/test_native_elementwise.py"], "the normalised row is not rounded to bf16 before the weight, as PyTorch's is",
      needs="avx512"),
    M("fused-residual-dropped", "llama/native/csrc/elementwise_avx512.cpp",
      [("out[i] = f32_to_bf16(bf16_to_f32(xr[i]) + bf16_to_f32(ar[i]));", "out[i] = xr[i];")],
      ["tests/unit/test_native_elementwise.py"], "the attention's output never reaches the residual stream", needs="avx512"),
    M("fused-norm-never-runs", "llama/model/transformer.py",
      [("if elementwise.fused(x) and add.dtype == self.weight.dtype == x.dtype:",
        "if False and elementwise.fused(x) and add.dtype == self.weight.dtype == x.dtype:")],
      ["tests/unit/test_native_elementwise.py"], "a bf16 model keeps PyTorch's several passes"),
]


def _copy_repo(dst: Path) -> None:
    """The tracked and untracked (not ignored) files of the repository, into dst."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _apply(text: str, mutation: Mutation) -> str:
    for old, new in mutation.edits:
        count = text.count(old)
        if count != 1:
            raise SystemExit(f"mutation {mutation.name}: {old!r} occurs {count} times in {mutation.path}")
        text = text.replace(old, new)
    return text


def machine_lacks(path: str) -> bool:
    """Whether this CPU does not run the native code path `path` (its tests skip here)."""
    probe = subprocess.run([sys.executable, "-c", "from llama import native; print(' '.join(native.paths()))"],
                           cwd=REPO, capture_output=True, text=True)
    return path not in probe.stdout.split()


def run_one(copy: Path, mutation: Mutation) -> Tuple[str, str, float]:
    """(result, detail, seconds): the mutant's tests run in `copy` with the edit applied."""
    target = copy / mutation.path
    original = target.read_text()
    target.write_text(_apply(original, mutation))
    tests = [t for t in mutation.tests if (copy / t).exists()]
    tests = list(dict.fromkeys(tests))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PYTHONPATH"] = str(copy)
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               "-p", "no:randomly", *tests], cwd=copy, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S, start_new_session=True)
        out = proc.stdout.strip().splitlines()
        failed = [line for line in out if line.startswith(("FAILED", "ERROR"))]
        if proc.returncode == 0:
            result, detail = "SURVIVED", out[-1] if out else ""
        elif proc.returncode == 1:
            result, detail = "killed", (failed[0].split(" - ")[0].replace("FAILED ", "") if failed else out[-1])
        else:
            result, detail = f"error rc={proc.returncode}", out[-1] if out else proc.stderr[-300:]
    except subprocess.TimeoutExpired:
        result, detail = "killed", f"timeout after {TIMEOUT_S}s (hang)"
    finally:
        target.write_text(original)
    return result, detail, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated mutation names")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--out", default=str(REPO / "tests" / "mutations_latest.md"))
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.path:22} {' '.join(m.tests)}")
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        copy = Path(tmp)
        _copy_repo(copy)
        for m in chosen:
            _apply((copy / m.path).read_text(), m)  # every edit must apply before anything runs
        lacking = {m.needs for m in chosen if m.needs and machine_lacks(m.needs)}
        for i, m in enumerate(chosen, 1):
            if m.needs in lacking:
                result, detail, seconds = f"not run: this CPU has no {m.needs} path", "", 0.0
            else:
                result, detail, seconds = run_one(copy, m)
            rows.append((m, result, detail, seconds))
            print(f"[{i}/{len(chosen)}] {m.name}: {result} ({seconds:.0f}s) {detail}", flush=True)
    lines = ["| mutant | file | breaks | result | killed by |", "|---|---|---|---|---|"]
    for m, result, detail, _ in rows:
        if result == "SURVIVED" and m.equivalent:
            result = f"equivalent: {m.equivalent}"
        lines.append(f"| {m.name} | {m.path} | {m.why} | {result} | {detail.replace('|', '/')} |")
    survived = sum(r == "SURVIVED" and not m.equivalent for m, r, _, _ in rows)
    equivalent = sum(r == "SURVIVED" and bool(m.equivalent) for m, r, _, _ in rows)
    not_run = sum(r.startswith("not run") for _, r, _, _ in rows)
    lines.append(f"\n{len(rows)} mutants: {len(rows) - survived - equivalent - not_run} killed, {equivalent} "
                 f"equivalent, {survived} survived, {not_run} not run on this CPU.")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
