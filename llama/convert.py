"""Foreign checkpoints to Meta's layout: `python -m llama.convert SRC DST`.

SRC is an HF model directory (config.json, safetensors, tokenizer files) or a .gguf
file. DST becomes a directory holding exactly what Llama.build needs: consolidated.NN.pth
shards, params.json (with the chat format recorded) and the tokenizer file.

HF's LlamaForCausalLM stores wq/wk permuted for its rotate-half rotary form; Meta's
layout rotates interleaved pairs, so each head's rows are put back in pair order. GGUF
files of the llama architecture already use Meta's order.
"""

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch

from .checkpoint import check_params, check_weights_fit, save_checkpoint
from .errors import LlamaError
from .progress import progress

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


# ---- HF model directories ------------------------------------------------------------

def _hf_tensors(src: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """Every tensor of an HF directory, from safetensors (or weights-only .bin files)."""
    from safetensors import safe_open

    files = sorted(src.glob("*.safetensors"))
    if files:
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise LlamaError(f"no *.safetensors or pytorch_model*.bin weights in {str(src)!r}")
    for path in bins:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # a pickle with code, or a damaged file
            raise LlamaError(f"refusing to read {str(path)!r}: not a plain weights file ({exc})") from None
        yield from state.items()


def _chat_format_from_template(template: str) -> Tuple[Optional[str], Optional[str]]:
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
    try:
        config = json.loads(config_path.read_text())
        params = params_from_hf_config(config)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, LlamaError):
            raise
        raise LlamaError(f"cannot read {str(config_path)!r} ({type(exc).__name__}: {exc}); it must be "
                         f"the config.json of an HF Llama model") from None
    check_params(params, str(config_path))
    hf = dict(progress(_hf_tensors(src), "reading weights"))
    weights = meta_from_hf_state_dict(hf, params)

    copied = False
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        if (src / name).is_file():
            shutil.copy(src / name, work / name)
            copied = copied or name in ("tokenizer.json", "tokenizer.model")
    if not copied:
        raise LlamaError(f"{str(src)!r} has neither tokenizer.json nor tokenizer.model to go with the weights")
    tok_config = src / "tokenizer_config.json"
    if tok_config.is_file():
        template = json.loads(tok_config.read_text()).get("chat_template") or ""
        name, system = _chat_format_from_template(template if isinstance(template, str) else "")
        if name:
            params["chat_format"] = name
        if system:
            params["default_system_prompt"] = system
    return weights, params


# ---- GGUF files ----------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}


_REQUIRED = object()


def _is_kind(value, kind) -> bool:
    """value is of `kind`: int, float (int allowed), str, or [kind] for a list of them."""
    if isinstance(kind, list):
        return isinstance(value, list) and all(_is_kind(v, kind[0]) for v in value)
    if kind is float:
        return type(value) in (int, float)
    return type(value) is kind


def _open_gguf(src: Path):
    """A gguf.GGUFReader that refuses to read past the end of the file. (The stock reader
    reads short there without complaint, so a damaged array length makes it loop for hours.)"""
    import gguf
    import numpy as np

    class BoundedReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise ValueError(f"the file ends at byte {len(self.data)}, before byte {end}")
            return super()._get(offset, dtype, count, override_order)

    return BoundedReader(str(src))


def convert_gguf(src: Path, work: Path) -> Tuple[Dict[str, torch.Tensor], dict]:
    try:
        return _convert_gguf(src, work)
    except LlamaError:
        raise
    except Exception as exc:  # on damaged files gguf, numpy and tokenizers raise nearly anything
        raise LlamaError(f"cannot convert GGUF file {str(src)!r}: it is truncated, damaged or not a "
                         f"Llama GGUF ({type(exc).__name__}: {exc}); download it again") from None


def _convert_gguf(src: Path, work: Path) -> Tuple[Dict[str, torch.Tensor], dict]:
    import gguf

    from .tokenizer import hf_tokenizer_json_from_gguf_vocab

    reader = _open_gguf(src)

    def get(key: str, kind, default=_REQUIRED):
        """Metadata `key`, checked to be of `kind` (see _is_kind); `default` if absent."""
        field = reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise LlamaError(f"GGUF file {str(src)!r} lacks the metadata key {key!r}; "
                                 f"is it a complete Llama model?")
            return default
        value = field.contents()
        if not _is_kind(value, kind):
            raise LlamaError(f"GGUF file {str(src)!r}: metadata {key!r} = {value!r:.60} is not of the "
                             f"expected kind {kind}; the file is damaged")
        return value

    arch = get("general.architecture", str, None)
    if arch != "llama":
        raise LlamaError(f"{str(src)!r} holds a {arch!r} model; only the 'llama' architecture is supported")
    tokens = get("tokenizer.ggml.tokens", [str])
    dim, n_heads = get("llama.embedding_length", int), get("llama.attention.head_count", int)
    params = {
        "dim": dim,
        "n_layers": get("llama.block_count", int),
        "n_heads": n_heads,
        "n_kv_heads": get("llama.attention.head_count_kv", int, n_heads),
        "vocab_size": get("llama.vocab_size", int, len(tokens)),
        "multiple_of": 1,
        "norm_eps": get("llama.attention.layer_norm_rms_epsilon", float, 1e-5),
        "rope_theta": get("llama.rope.freq_base", float, 10000.0),
    }
    check_params(params, str(src))
    params["ffn_dim_multiplier"] = (get("llama.feed_forward_length", int) + 0.5) / int(8 * dim / 3)

    weights: Dict[str, torch.Tensor] = {}
    for tensor in progress(reader.tensors, "dequantizing"):
        value = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        name = tensor.name
        if name == "token_embd.weight":
            weights["tok_embeddings.weight"] = value
        elif name == "output_norm.weight":
            weights["norm.weight"] = value
        elif name == "output.weight":
            weights["output.weight"] = value
        elif name == "rope_freqs.weight":
            params.update(_llama31_scaling_from_factors(value, params))
        elif name.startswith("blk.") and name.count(".") == 3 and name.split(".")[2] in _GGUF_LAYER_NAMES:
            _, index, kind, leaf = name.split(".")
            weights[f"layers.{index}.{_GGUF_LAYER_NAMES[kind]}.{leaf}"] = value
        else:
            raise LlamaError(f"unexpected tensor {name!r} in {str(src)!r}: not a Llama weight")
    if "tok_embeddings.weight" not in weights:
        raise LlamaError(f"{str(src)!r} has no token_embd.weight tensor; is it a complete Llama model?")
    if "output.weight" not in weights:  # tied embeddings
        weights["output.weight"] = weights["tok_embeddings.weight"]

    model = get("tokenizer.ggml.model", str, None)
    if model != "gpt2":
        raise LlamaError(f"{str(src)!r} uses a {model!r} tokenizer; only byte-level BPE ('gpt2') "
                         f"tokenizers can be converted from GGUF so far")
    token_types = get("tokenizer.ggml.token_type", [int])
    ids = {key: get(f"tokenizer.ggml.{key}_token_id", int, None) for key in ("bos", "eos", "padding")}
    if len(token_types) != len(tokens) or any(i is not None and not 0 <= i < len(tokens) for i in ids.values()):
        raise LlamaError(f"GGUF file {str(src)!r}: the token types or special token ids do not fit its "
                         f"{len(tokens)} tokens; the file is damaged")
    bos, eos, pad = ids["bos"], ids["eos"], ids["padding"]
    (work / "tokenizer.json").write_text(hf_tokenizer_json_from_gguf_vocab(
        tokens, get("tokenizer.ggml.merges", [str]), token_types, bos, eos,
        get("tokenizer.ggml.pre", str, "default")))
    (work / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
        "pad_token": tokens[pad] if pad is not None else None,
        "add_bos_token": bool(get("tokenizer.ggml.add_bos_token", bool, True)),
    }, indent=2) + "\n")
    name, system = _chat_format_from_template(get("tokenizer.chat_template", str, ""))
    if name:
        params["chat_format"] = name
    if system:
        params["default_system_prompt"] = system
    return weights, params


def _llama31_scaling_from_factors(factors: torch.Tensor, params: dict) -> dict:
    """GGUF stores Llama 3.1 rotary scaling as per-frequency divisors; find the settings
    (factor 8 as in Llama 3.1, or 32 as in Llama 3.2) that reproduce them."""
    from .model import ModelArgs, rope_frequencies

    base = ModelArgs.from_params(params)
    for factor in (8.0, 32.0, 16.0, 4.0):
        scaled = ModelArgs.from_params({**params, "use_scaled_rope": True, "rope_scaling_factor": factor})
        ratio = rope_frequencies(base) / rope_frequencies(scaled)
        if torch.allclose(ratio, factors.float(), rtol=1e-3):
            return {"use_scaled_rope": True, "rope_scaling_factor": factor}
    raise LlamaError("this GGUF file uses a rotary scaling this engine does not recognise")


# ---- the command ---------------------------------------------------------------------

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def convert(src: str, dst: str, model_parallel_size: int = 1, dtype: str = "bf16",
            force: bool = False) -> Path:
    """Convert SRC (HF directory or .gguf file) into a Meta-layout checkpoint at DST.

    The result is written to a temporary sibling directory and moved into place only when
    complete, so a crash never leaves a half-written checkpoint at DST.
    """
    source, target = Path(src), Path(dst)
    if dtype not in _DTYPES:
        raise LlamaError(f"--dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    if not isinstance(model_parallel_size, int) or model_parallel_size < 1:
        raise LlamaError(f"--model-parallel-size {model_parallel_size!r} must be a positive integer")
    if not source.exists():
        raise LlamaError(f"source {src!r} does not exist; give an HF model directory or a .gguf file")
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise LlamaError(f"destination {dst!r} exists and is not empty; choose another path or pass --force")

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        if source.is_dir():
            weights, params = convert_hf(source, work)
        elif source.suffix == ".gguf":
            weights, params = convert_gguf(source, work)
        else:
            raise LlamaError(f"source {src!r} is neither a directory nor a .gguf file")
        check_weights_fit(weights, params, src)
        # Tied weights stay one tensor. Keying on id() is safe here: every tensor stays alive in
        # `weights` throughout, so no id can be reused (unlike the address of a freed temporary).
        cast = {id(v): v.to(_DTYPES[dtype]) for v in weights.values()}
        weights = {k: cast[id(v)] for k, v in weights.items()}
        save_checkpoint(weights, params, str(work), model_parallel_size)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(old / target.name)
            work.rename(target)
            shutil.rmtree(old)
        else:
            work.rename(target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def main(src: str, dst: str, model_parallel_size: int = 1, dtype: str = "bf16", force: bool = False) -> None:
    """Convert an HF model directory or a GGUF file into Meta's checkpoint layout.

    Args:
        src: HF model directory (config.json + safetensors + tokenizer) or a .gguf file.
        dst: output directory (must not exist or be empty, unless --force).
        model_parallel_size: number of consolidated.NN.pth shards to write.
        dtype: bf16, fp16 or fp32.
        force: replace a non-empty destination.
    """
    out = convert(src, dst, model_parallel_size, dtype, force)
    print(f"wrote {out}")


if __name__ == "__main__":
    from .cli import run

    run(main)
