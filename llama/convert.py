"""Foreign checkpoints to Meta's layout.

HF's LlamaForCausalLM stores wq/wk permuted for its rotate-half rotary form; Meta's
layout rotates interleaved pairs, so each head's rows are put back in pair order.
"""

from typing import Dict

import torch

from .errors import LlamaError

# HF parameter name (after "model.layers.N.") -> Meta's name (after "layers.N.")
_HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's per-head q/k row permutation (rotate-half order -> interleaved pairs).

    weight: [n_heads * head_dim, dim]. Within a head, HF stores the first elements of
    all pairs, then the second elements; Meta stores each pair together.
    """
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def params_from_hf_config(config: dict) -> dict:
    """Meta params.json values from an HF LlamaConfig dict."""
    arch = config.get("architectures") or [config.get("model_type", "?")]
    if config.get("model_type", "llama") != "llama":
        raise LlamaError(f"unsupported architecture {arch}: only Llama-family models "
                         f"(model_type 'llama') can be converted")
    dim, hidden = config["hidden_size"], config["intermediate_size"]
    params = {
        "dim": dim,
        "n_layers": config["num_hidden_layers"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "vocab_size": config["vocab_size"],
        "norm_eps": config.get("rms_norm_eps", 1e-5),
        # Chosen so Meta's hidden-size rule gives back HF's intermediate_size exactly
        # (the +0.5 keeps int() from rounding down on floating-point error).
        "multiple_of": 1,
        "ffn_dim_multiplier": (hidden + 0.5) / int(8 * dim / 3),
    }
    # transformers >= 5 keeps rotary settings in rope_parameters, older ones in rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    params["rope_theta"] = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        params.update(use_scaled_rope=True, rope_scaling_factor=rope["factor"],
                      rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
                      rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
                      rope_original_context=rope.get("original_max_position_embeddings", 8192))
    elif rope_type != "default":
        raise LlamaError(f"unsupported rotary scaling {rope_type!r}; only Llama 3.1-style "
                         f"('llama3') scaling is supported")
    return params


def meta_from_hf_state_dict(hf: Dict[str, torch.Tensor], params: dict) -> Dict[str, torch.Tensor]:
    """Rename HF LlamaForCausalLM weights to Meta's names, undoing the q/k permutation."""
    n_heads, n_kv_heads = params["n_heads"], params["n_kv_heads"]
    meta: Dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        if name == "model.embed_tokens.weight":
            meta["tok_embeddings.weight"] = tensor
        elif name == "model.norm.weight":
            meta["norm.weight"] = tensor
        elif name == "lm_head.weight":
            meta["output.weight"] = tensor
        elif name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            if rest not in _HF_LAYER_NAMES:
                if rest.endswith("rotary_emb.inv_freq"):
                    continue  # derived from rope_theta, not a weight
                raise LlamaError(f"unexpected weight {name!r}: not a Llama layer weight")
            if rest == "self_attn.q_proj.weight":
                tensor = unpermute_rotary(tensor, n_heads)
            elif rest == "self_attn.k_proj.weight":
                tensor = unpermute_rotary(tensor, n_kv_heads)
            meta[f"layers.{index}.{_HF_LAYER_NAMES[rest]}"] = tensor
        else:
            raise LlamaError(f"unexpected weight {name!r}: not a Llama weight")
    if "output.weight" not in meta:  # tied embeddings
        meta["output.weight"] = meta["tok_embeddings.weight"]
    return meta
