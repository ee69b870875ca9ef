"""Tiny foreign models for the converter: a one-layer Llama GGUF and the same model as an HF
directory."""

import json
from pathlib import Path

TINY_TOKENS = ["a", "b", "c", "ab", "abc", "Ġ", "<|im_start|>", "<|im_end|>"]  # ids 6, 7: ChatML specials
TINY_MERGES = ["a b", "ab c"]
TINY_TOKEN_TYPES = [1] * 6 + [3, 3]


def write_tiny_gguf(path: Path, dim: int = 8, n_heads: int = 2, n_kv_heads: int = 1, hidden: int = 16) -> Path:
    """A one-layer Llama GGUF with a byte-level BPE vocabulary of 8 tokens (ChatML specials)."""
    import gguf
    import numpy as np

    tokens = TINY_TOKENS
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(TINY_MERGES)
    w.add_token_types(TINY_TOKEN_TYPES)
    w.add_bos_token_id(6)
    w.add_eos_token_id(7)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    kv = dim // n_heads * n_kv_heads
    shapes = {"token_embd.weight": (len(tokens), dim), "output_norm.weight": (dim,),
              "blk.0.attn_q.weight": (dim, dim), "blk.0.attn_k.weight": (kv, dim), "blk.0.attn_v.weight": (kv, dim),
              "blk.0.attn_output.weight": (dim, dim), "blk.0.ffn_gate.weight": (hidden, dim),
              "blk.0.ffn_down.weight": (dim, hidden), "blk.0.ffn_up.weight": (hidden, dim),
              "blk.0.attn_norm.weight": (dim,), "blk.0.ffn_norm.weight": (dim,)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_hf_dir(folder: Path, dim: int = 8, n_heads: int = 2, n_kv_heads: int = 1, hidden: int = 16) -> Path:
    """The same tiny model as an HF directory: config.json, model.safetensors (HF names, with
    lm_head), tokenizer.json and tokenizer_config.json (ChatML template)."""
    import torch
    from safetensors.torch import save_file

    from llama.checkpoint.convert.gguf_tokenizer import hf_tokenizer_json_from_gguf_vocab

    folder.mkdir(parents=True, exist_ok=True)
    vocab, kv = len(TINY_TOKENS), dim // n_heads * n_kv_heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
              "intermediate_size": hidden, "num_hidden_layers": 1, "num_attention_heads": n_heads,
              "num_key_value_heads": n_kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32"}
    layer = {"self_attn.q_proj": (dim, dim), "self_attn.k_proj": (kv, dim), "self_attn.v_proj": (kv, dim),
             "self_attn.o_proj": (dim, dim), "mlp.gate_proj": (hidden, dim), "mlp.up_proj": (hidden, dim),
             "mlp.down_proj": (dim, hidden), "input_layernorm": (dim,), "post_attention_layernorm": (dim,)}
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim),
              **{f"model.layers.0.{name}.weight": shape for name, shape in layer.items()}}
    g = torch.Generator().manual_seed(0)
    save_file({name: torch.randn(shape, generator=g) for name, shape in shapes.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_text(hf_tokenizer_json_from_gguf_vocab(
        TINY_TOKENS, TINY_MERGES, TINY_TOKEN_TYPES, 6, 7, "smollm"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True},
        "add_bos_token": False, "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n"
                                                  "{{ m.content }}<|im_end|>\n{% endfor %}"}, indent=2))
    return folder
