"""HF model directories (config.json, safetensors or weights-only .bin, tokenizer files) to
Meta's names and layout. HF's LlamaForCausalLM stores wq/wk permuted for its rotate-half
rotary form; Meta's layout rotates interleaved pairs, so each head's rows are put back in
pair order. The chat format is recognised from tokenizer_config.json's chat template."""

import re
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ...errors import LlamaError
from ...utils.checks import BOOL, OBJECT, POSITIVE_INT, POSITIVE_NUMBER, STRING, Kind, field, one_of, read_json_object
from ...utils.progress import progress
from ..params import check_params

# HF parameter name -> Meta's name, outside the layers and (after "model.layers.N." ->
# "layers.N.") inside them
_HF_MODEL_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                   "lm_head.weight": "output.weight"}
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


def params_from_hf_config(config: dict, where: str = "config.json") -> dict:
    """Meta params.json values from an HF LlamaConfig dict; LlamaError naming `where` (the
    file) and the field for a value of the wrong kind or out of range."""
    model_type = field(config, "model_type", STRING, where, "llama")
    if model_type != "llama":
        arch = config.get("architectures") or [model_type]
        raise LlamaError(f"unsupported architecture {arch}: only Llama-family models "
                         f"(model_type 'llama') can be converted")
    dim = field(config, "hidden_size", POSITIVE_INT, where)
    hidden = field(config, "intermediate_size", POSITIVE_INT, where)
    n_heads = field(config, "num_attention_heads", POSITIVE_INT, where)
    params = {
        "dim": dim,
        "n_layers": field(config, "num_hidden_layers", POSITIVE_INT, where),
        "n_heads": n_heads,
        "n_kv_heads": field(config, "num_key_value_heads", POSITIVE_INT, where, n_heads),
        "vocab_size": field(config, "vocab_size", POSITIVE_INT, where),
        "norm_eps": field(config, "rms_norm_eps", POSITIVE_NUMBER, where, 1e-5),
        # Chosen so Meta's hidden-size rule gives back HF's intermediate_size exactly
        # (the +0.5 keeps int() from rounding down on floating-point error).
        "multiple_of": 1,
        "ffn_dim_multiplier": (hidden + 0.5) / int(8 * dim / 3),
    }
    # transformers >= 5 keeps rotary settings in rope_parameters, older ones in rope_scaling.
    rope_key = "rope_parameters" if config.get("rope_parameters") is not None else "rope_scaling"
    rope = field(config, rope_key, OBJECT, where, {})

    def rope_field(key: str, kind: Kind, default=None):
        return field(rope, key, kind, where, default, name=f"{rope_key}.{key}")

    params["rope_theta"] = field(config, "rope_theta", POSITIVE_NUMBER, where, None) or \
        rope_field("rope_theta", POSITIVE_NUMBER, 10000.0)
    rope_type = rope_field("rope_type", STRING) or rope_field("type", STRING, "default")
    if rope_type == "llama3":
        params.update(use_scaled_rope=True,
                      rope_scaling_factor=field(rope, "factor", POSITIVE_NUMBER, where, name=f"{rope_key}.factor"),
                      rope_low_freq_factor=rope_field("low_freq_factor", POSITIVE_NUMBER, 1.0),
                      rope_high_freq_factor=rope_field("high_freq_factor", POSITIVE_NUMBER, 4.0),
                      rope_original_context=rope_field("original_max_position_embeddings", POSITIVE_INT, 8192))
    elif rope_type != "default":
        raise LlamaError(f"{where!r}: unsupported rotary scaling {rope_type!r}; only Llama 3.1-style "
                         f"('llama3') scaling is supported")
    return params


def meta_from_hf_state_dict(hf: Dict[str, torch.Tensor], params: dict) -> Dict[str, torch.Tensor]:
    """Rename HF LlamaForCausalLM weights to Meta's names, undoing the q/k permutation."""
    n_heads, n_kv_heads = params["n_heads"], params["n_kv_heads"]
    meta: Dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        if name in _HF_MODEL_NAMES:
            meta[_HF_MODEL_NAMES[name]] = tensor
        elif re.fullmatch(r"model\.layers\.\d+\..+", name):
            index, rest = name[len("model.layers."):].split(".", 1)
            if rest not in _HF_LAYER_NAMES:
                if rest.endswith("rotary_emb.inv_freq"):
                    continue  # derived from rope_theta, not a weight
                raise LlamaError(f"unexpected weight {name!r}: not a Llama layer weight")
            if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                heads = n_heads if rest.startswith("self_attn.q") else n_kv_heads
                if tensor.dim() != 2 or tensor.shape[0] % (2 * heads):
                    raise LlamaError(f"weight {name!r} has shape {tuple(tensor.shape)}, which does not split "
                                     f"into the config's {heads} heads; the files do not belong together")
                tensor = unpermute_rotary(tensor, heads)
            meta[f"layers.{int(index)}.{_HF_LAYER_NAMES[rest]}"] = tensor
        else:
            raise LlamaError(f"unexpected weight {name!r}: not a Llama weight")
    if "output.weight" not in meta and "tok_embeddings.weight" in meta:  # tied embeddings
        meta["output.weight"] = meta["tok_embeddings.weight"]
    return meta


# ---- HF model directories ------------------------------------------------------------

def _hf_tensors(src: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of an HF directory, from safetensors (or weights-only .bin files). A
    damaged file, a tensor that is not floating point, or one found in two files is a
    LlamaError naming the file."""
    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise LlamaError(f"no *.safetensors or pytorch_model*.bin weights in {str(src)!r}")
    found: Dict[str, Path] = {}
    tensors: Dict[str, torch.Tensor] = {}
    for path in progress(files, "reading weights", unit="file"):
        for name, tensor in _read_weights_file(path).items():
            if name in found:
                raise LlamaError(f"weight {name!r} is in both {str(found[name])!r} and {str(path)!r}; "
                                 f"remove the stray file (a leftover of another download?)")
            if not tensor.is_floating_point():
                raise LlamaError(f"weight {name!r} in {str(path)!r} is of type {tensor.dtype}; Llama "
                                 f"weights are floating point: the file is damaged or not a Llama model")
            found[name], tensors[name] = path, tensor
    return tensors


def _read_weights_file(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # SafetensorError for a lying header; also OSError, MemoryError
            raise LlamaError(f"cannot read {str(path)!r}: its header or data is damaged "
                             f"({type(exc).__name__}: {exc}); download it again") from None
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # a pickle with code, or a damaged file
        raise LlamaError(f"refusing to read {str(path)!r}: not a plain weights file ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise LlamaError(f"{str(path)!r} does not hold a dict of named tensors; is it an HF weights file?")
    return state


def chat_format_from_template(template: str) -> Tuple[Optional[str], Optional[str]]:
    """(chat format name, default system prompt) recognised from a Jinja chat template."""
    if "<|im_start|>" in template:
        # SmolLM-style templates insert a fixed system message when the dialog has none.
        match = re.search(r"'<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
        return "chatml", match.group(1) if match else None
    if "<|start_header_id|>" in template:
        return "llama3", None
    if "[INST]" in template:
        return "llama2", None
    return None, None


def convert_hf(src: Path, work: Path) -> Tuple[Dict[str, torch.Tensor], dict]:
    config_path = src / "config.json"
    if not config_path.is_file():
        raise LlamaError(f"{str(src)!r} has no config.json; is it an HF model directory?")
    config = read_json_object(config_path)
    params = params_from_hf_config(config, str(config_path))
    check_params(params, str(config_path))
    tied = field(config, "tie_word_embeddings", BOOL, config_path, False)  # HF's default for Llama
    hf = _hf_tensors(src)
    if tied:
        hf.pop("lm_head.weight", None)  # HF uses the embeddings, whatever the file holds
    elif "lm_head.weight" not in hf:
        raise LlamaError(f"{str(config_path)!r} says tie_word_embeddings is false (HF's default when it "
                         f"is absent) but the weights in {str(src)!r} have no lm_head.weight; the "
                         f"download is incomplete, or set \"tie_word_embeddings\": true if the model ties them")
    try:
        weights = meta_from_hf_state_dict(hf, params)
    except LlamaError as exc:
        raise LlamaError(f"{str(src)!r}: {exc}") from None

    copied = False
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        if (src / name).is_file():
            shutil.copyfile(src / name, work / name)  # copyfile: the new file gets the user's umask
            copied = copied or name in ("tokenizer.json", "tokenizer.model")
    if not copied:
        raise LlamaError(f"{str(src)!r} has neither tokenizer.json nor tokenizer.model to go with the weights")
    tok_config = src / "tokenizer_config.json"
    if tok_config.is_file():
        name, system = chat_format_from_template(_chat_template(read_json_object(tok_config), tok_config))
        if name:
            params["chat_format"] = name
        if system:
            params["default_system_prompt"] = system
    return weights, params


_NAMED_TEMPLATE = Kind("a list of {name, template} objects",
                       lambda v: isinstance(v, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str)
                                                             for t in v))


def _chat_template(tok_config: dict, where: Path) -> str:
    """tokenizer_config.json's chat_template: a string, or HF's list of named templates
    (the one named "default" is used)."""
    template = field(tok_config, "chat_template", one_of(STRING, _NAMED_TEMPLATE), where, "")
    if isinstance(template, list):
        named = {t.get("name"): t["template"] for t in template}
        return named.get("default", template[0]["template"] if template else "")
    return template
