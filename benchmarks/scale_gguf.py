"""The --scale model (benchmarks/run.py) as GGUF files for llama.cpp, so that each bit width is
compared at equal bits: bf16 written by the gguf package from our Meta-layout checkpoint (the
same weights, bit for bit, with Meta's Llama 3 tokenizer), then Q8_0 and Q4_0 made from it by
llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize).

    python benchmarks/scale_gguf.py      # makes them once, under the scale model's folder

Tensors keep Meta's layout, which is llama.cpp's for the "llama" architecture (q and k in
interleaved rotary pairs: HF's converter permutes HF weights back to it). The vocabulary is
written the way llama.cpp reads a GPT-2-style BPE ("gpt2" model, "llama-bpe" pre-tokenizer):
each token's bytes as printable characters, merges rebuilt from tiktoken's ranks.
"""

import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
QUANTIZED = {"q8_0": 7, "q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_0


def byte_characters() -> Dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves,
    the others take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def vocabulary(tokenizer_model: Path) -> Tuple[List[str], List[int], List[str]]:
    """(token strings, token types, merges) of Meta's Llama 3 tokenizer for a GGUF file."""
    import gguf
    from tiktoken.load import load_tiktoken_bpe

    sys.path.insert(0, str(ROOT))
    from llama.tokenizer import LLAMA3_SPECIAL_TOKENS

    ranks = load_tiktoken_bpe(str(tokenizer_model))
    chars = byte_characters()
    spell = lambda piece: "".join(chars[b] for b in piece)
    by_rank = sorted(ranks, key=ranks.get)
    tokens = [spell(piece) for piece in by_rank] + list(LLAMA3_SPECIAL_TOKENS)
    types = [gguf.TokenType.NORMAL] * len(by_rank) + [gguf.TokenType.CONTROL] * len(LLAMA3_SPECIAL_TOKENS)
    # Each token of two or more bytes is made by merging two tokens; BPE applies merges in
    # the order of the merged token's rank (ties: the ranks of the two halves).
    merges = []
    for piece in by_rank:
        halves = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in ranks and piece[i:] in ranks]
        halves.sort(key=lambda h: (ranks[h[0]], ranks[h[1]]))
        merges += [f"{spell(left)} {spell(right)}" for left, right in halves]
    return tokens, types, merges


def write_bf16(meta: Path, out: Path) -> None:
    """Our converted checkpoint (consolidated.00.pth, bf16) as a GGUF file, tensors as they are."""
    import gguf
    import numpy as np
    import torch

    params = json.loads((meta / "params.json").read_text())
    state = torch.load(meta / "consolidated.00.pth", map_location="cpu", mmap=True, weights_only=True)
    dim, layers, heads = params["dim"], params["n_layers"], params["n_heads"]
    kv_heads = params.get("n_kv_heads", heads)
    hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
    tokens, types, merges = vocabulary(meta / "tokenizer.model")
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("llama-3.2-1b-shape-random")
    writer.add_context_length(4096)
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(dim // heads)
    writer.add_rope_freq_base(float(params.get("rope_theta", 500000.0)))
    writer.add_layer_norm_rms_eps(float(params.get("norm_eps", 1e-5)))
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    writer.add_eos_token_id(tokens.index("<|end_of_text|>"))
    names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}
    parts = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
             "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
             "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}
    for i in range(layers):
        names.update({f"layers.{i}.{ours}.weight": f"blk.{i}.{theirs}.weight" for ours, theirs in parts.items()})
    for ours, theirs in names.items():
        if ours not in state:  # a tied output matrix may be left out: llama.cpp then uses token_embd
            continue
        tensor = state[ours]
        if tensor.dim() == 1:  # norms: fp32, as llama.cpp's converter keeps them
            writer.add_tensor(theirs, tensor.float().numpy())
        else:  # bf16 bits as they are (numpy has no bf16): [N, 2K] bytes, the element type named
            raw = tensor.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
            writer.add_tensor(theirs, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(source: Path, out: Path, layout: str) -> None:
    """llama.cpp's own quantizer, as `llama-quantize source out Q8_0` runs it."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZED[layout]
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({source}, {layout}) returned {rc}")


def scale_gguf_files(meta: Path) -> Dict[str, Path]:
    """{"bf16": path, "q8_0": path, "q4_0": path} beside the checkpoint, each made once."""
    folder = meta.parent / "gguf"
    folder.mkdir(exist_ok=True)
    files = {layout: folder / f"model-{layout}.gguf" for layout in ("bf16", *QUANTIZED)}
    if not files["bf16"].exists():
        partial = files["bf16"].with_suffix(".part")
        write_bf16(meta, partial)
        partial.rename(files["bf16"])
    for layout in QUANTIZED:
        if not files[layout].exists():
            partial = files[layout].with_suffix(".part")
            quantize(files["bf16"], partial, layout)
            partial.rename(files[layout])
    return files


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import scale_dirs

    for layout, path in scale_gguf_files(scale_dirs()["meta"]).items():
        print(f"{layout}: {path} ({path.stat().st_size / 1e9:.2f} GB)")
