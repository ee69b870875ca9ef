"""Foreign checkpoints to Meta's layout: `python -m llama.convert SRC DST`.

SRC is an HF model directory (config.json, safetensors, tokenizer files) or a .gguf
file. DST becomes a directory holding exactly what Llama.build needs: consolidated.NN.pth
shards, params.json (with the chat format recorded) and the tokenizer file.

HF's LlamaForCausalLM stores wq/wk permuted for its rotate-half rotary form; Meta's
layout rotates interleaved pairs, so each head's rows are put back in pair order. GGUF
files of the llama architecture already use Meta's order.
"""

import json
import math
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from .checkpoint import check_params, check_weights_fit, save_checkpoint
from .errors import LlamaError
from .fields import (BOOL, INT, OBJECT, POSITIVE_INT, POSITIVE_NUMBER, STRING, Kind, field, list_of, one_of,
                     read_json_object)
from .loading import DTYPES
from .locking import hold
from .progress import progress

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
        name, system = _chat_format_from_template(_chat_template(read_json_object(tok_config), tok_config))
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


# ---- GGUF files ----------------------------------------------------------------------

_GGUF_MODEL_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                     "output.weight": "output.weight"}
_GGUF_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}


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

    reader = BoundedReader(str(src))
    _check_gguf_tensor_bounds(reader, src)
    return reader


def _check_gguf_tensor_bounds(reader, src: Path) -> None:
    """Each tensor's shape and offset, in exact integers, lie inside the file. (The reader
    adds them in 64-bit numpy integers, which wrap around silently: an offset near 2^64
    would read the file's own header as weights.)"""
    from gguf.constants import GGML_QUANT_SIZES

    for tensor in reader.tensors:
        dims = [int(d) for d in tensor.field.parts[3]]
        offset = int(reader.data_offset) + int(tensor.field.parts[-1][0])
        block, block_bytes = GGML_QUANT_SIZES[tensor.tensor_type]
        count = math.prod(dims)
        end = offset + count // block * block_bytes
        if not dims or min(dims) < 1 or count % block or offset != int(tensor.data_offset) or end > len(reader.data):
            raise LlamaError(f"GGUF file {str(src)!r}: tensor {tensor.name!r} has shape {dims} at byte offset "
                             f"{offset}, which does not lie inside the file ({len(reader.data)} bytes); "
                             f"the file is damaged: download it again")


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

    from .gguf_tokenizer import hf_tokenizer_json_from_gguf_vocab

    reader = _open_gguf(src)

    def get(key: str, kind: Kind, default=...):
        """Metadata `key`, checked to be of `kind`; `default` if absent (required if not given)."""
        entry = reader.fields.get(key)
        if entry is None and default is ...:
            raise LlamaError(f"GGUF file {str(src)!r} lacks the metadata key {key!r}; "
                             f"is it a complete Llama model?")
        return default if entry is None else field({key: entry.contents()}, key, kind, src)

    arch = get("general.architecture", STRING, None)
    if arch != "llama":
        raise LlamaError(f"{str(src)!r} holds a {arch!r} model; only the 'llama' architecture is supported")
    tokens = get("tokenizer.ggml.tokens", list_of(STRING))
    dim, n_heads = get("llama.embedding_length", POSITIVE_INT), get("llama.attention.head_count", POSITIVE_INT)
    params = {
        "dim": dim,
        "n_layers": get("llama.block_count", POSITIVE_INT),
        "n_heads": n_heads,
        "n_kv_heads": get("llama.attention.head_count_kv", POSITIVE_INT, n_heads),
        "vocab_size": get("llama.vocab_size", POSITIVE_INT, len(tokens)),
        "multiple_of": 1,
        "norm_eps": get("llama.attention.layer_norm_rms_epsilon", POSITIVE_NUMBER, 1e-5),
        "rope_theta": get("llama.rope.freq_base", POSITIVE_NUMBER, 10000.0),
    }
    check_params(params, str(src))
    params["ffn_dim_multiplier"] = (get("llama.feed_forward_length", POSITIVE_INT) + 0.5) / int(8 * dim / 3)

    weights: Dict[str, torch.Tensor] = {}
    for tensor in progress(reader.tensors, "dequantizing"):
        value = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        name = tensor.name
        if name in _GGUF_MODEL_NAMES:
            weights[_GGUF_MODEL_NAMES[name]] = value
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

    model = get("tokenizer.ggml.model", STRING, None)
    if model != "gpt2":
        raise LlamaError(f"{str(src)!r} uses a {model!r} tokenizer; only byte-level BPE ('gpt2') "
                         f"tokenizers can be converted from GGUF so far")
    token_types = get("tokenizer.ggml.token_type", list_of(INT))
    ids = {key: get(f"tokenizer.ggml.{key}_token_id", INT, None) for key in ("bos", "eos", "padding")}
    if len(token_types) != len(tokens) or any(i is not None and not 0 <= i < len(tokens) for i in ids.values()):
        raise LlamaError(f"GGUF file {str(src)!r}: the token types or special token ids do not fit its "
                         f"{len(tokens)} tokens; the file is damaged")
    bos, eos, pad = ids["bos"], ids["eos"], ids["padding"]
    (work / "tokenizer.json").write_text(hf_tokenizer_json_from_gguf_vocab(
        tokens, get("tokenizer.ggml.merges", list_of(STRING)), token_types, bos, eos,
        get("tokenizer.ggml.pre", STRING, "default")))
    (work / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
        "pad_token": tokens[pad] if pad is not None else None,
        "add_bos_token": bool(get("tokenizer.ggml.add_bos_token", BOOL, True)),
    }, indent=2) + "\n")
    name, system = _chat_format_from_template(get("tokenizer.chat_template", STRING, ""))
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

# Written into every folder llama.convert makes: what --force may replace, and what a
# leftover of an interrupted run may be removed by.
MARKER = ".llama-convert.json"


def convert(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], model_parallel_size: int = 1,
            dtype: str = "bf16", force: bool = False, quiet: bool = False) -> Path:
    """Convert SRC (HF directory or .gguf file) into a Meta-layout checkpoint at DST.

    The result is written to a sibling folder `.DST.partial-*` and renamed into place only
    when complete, under a lock (`.DST.lock`) that makes concurrent conversions into DST
    take turns; leftovers of a killed run are removed first (with a message unless quiet).
    With force, DST may be replaced only if it is an earlier output of llama.convert (it
    holds MARKER and nothing else); a folder that is or holds SRC is never replaced.
    """
    source, target = _path_arg(src, "SRC"), _path_arg(dst, "DST")
    if dtype not in DTYPES:
        raise LlamaError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if isinstance(model_parallel_size, bool) or not isinstance(model_parallel_size, int) or model_parallel_size < 1:
        raise LlamaError(f"--model-parallel-size {model_parallel_size!r} must be a positive integer")
    if not source.exists():
        raise LlamaError(f"source {str(src)!r} does not exist; give an HF model directory or a .gguf file")
    if not source.is_dir() and source.suffix != ".gguf":
        raise LlamaError(f"source {str(src)!r} is neither a directory nor a .gguf file")
    _check_destination(source, target, force)  # before the lock: a refusal leaves no trace
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlamaError(f"cannot create the folder {str(target.parent)!r} for DST ({exc.strerror or exc})") from None
    with hold(target, f"the conversion into {str(dst)!r}", quiet=quiet):
        _remove_leftovers(target, quiet)
        _check_destination(source, target, force)  # again: another process may have written it
        work = _new_work_dir(target)
        try:
            weights, params = convert_hf(source, work) if source.is_dir() else convert_gguf(source, work)
            check_weights_fit(weights, params, str(src))
            # Tied weights stay one tensor. Keying on id() is safe here: every tensor stays alive in
            # `weights` throughout, so no id can be reused (unlike the address of a freed temporary).
            cast = {id(v): v.to(DTYPES[dtype]) for v in weights.values()}
            weights = {k: cast[id(v)] for k, v in weights.items()}
            save_checkpoint(weights, params, str(work), model_parallel_size)
            _write_marker(work, {"source": str(source.resolve()), "files": sorted(p.name for p in work.iterdir())})
            _move_into_place(work, target)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return target


def _path_arg(value, name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise LlamaError(f"{name} must be a file or folder name, got {value!r}")
    return Path(value)


def _check_destination(source: Path, target: Path, force: bool) -> None:
    """LlamaError unless writing the conversion at `target` loses nothing: DST is new, empty,
    or (with force) an earlier output of llama.convert holding nothing else; never SRC or a
    folder holding SRC, never a link, never a file."""
    if target.is_symlink():
        raise LlamaError(f"destination {str(target)!r} is a symbolic link; give a new folder path")
    if target.resolve() == source.resolve() or target.resolve() in source.resolve().parents:
        raise LlamaError(f"destination {str(target)!r} is the source {str(source)!r} or a folder holding it; "
                         f"converting there would replace the source: give a new folder path")
    if not target.exists():
        return
    if not target.is_dir():
        raise LlamaError(f"destination {str(target)!r} is a file, not a folder; give a new folder path")
    present = sorted(p.name for p in target.iterdir())
    if not present:
        return
    if not force:
        raise LlamaError(f"destination {str(target)!r} exists and is not empty; choose another path, or "
                         f"pass --force to replace an earlier output of llama.convert")
    written = _marker(target).get("files")
    if not isinstance(written, list):
        raise LlamaError(f"--force: {str(target)!r} was not written by llama.convert (it has no complete "
                         f"{MARKER}), so it is not replaced; move it away or choose another path")
    foreign = [name for name in present if name not in written and name != MARKER]
    if foreign:
        raise LlamaError(f"--force: {str(target)!r} holds files llama.convert did not write "
                         f"({', '.join(foreign[:5])}); nothing was changed: move them away first")


def _marker(folder: Path) -> dict:
    """The MARKER of `folder` ({} if absent or unreadable)."""
    try:
        value = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_marker(folder: Path, fields: dict) -> None:
    text = json.dumps({"written_by": "llama.convert", **fields}, indent=2) + "\n"
    (folder / MARKER).write_text(text, encoding="utf-8")


def _new_work_dir(target: Path) -> Path:
    """A new `.DST.partial-*` folder beside target, created with the user's umask (not
    mkdtemp's 0700) and marked as ours at once."""
    while True:
        work = target.with_name(f".{target.name}.partial-{secrets.token_hex(4)}")
        try:
            work.mkdir()
        except FileExistsError:
            continue
        _write_marker(work, {"complete": False})
        return work


def _remove_leftovers(target: Path, quiet: bool) -> None:
    """Delete the `.DST.partial-*` / `.DST.old-*` folders of a conversion that was killed.
    Only folders that are empty or carry MARKER go: we made those (and hold the lock, so
    no live conversion is using them)."""
    for leftover in sorted(target.parent.glob(f".{target.name}.partial-*")) + \
            sorted(target.parent.glob(f".{target.name}.old-*")):
        if leftover.is_symlink() or not leftover.is_dir():
            continue
        if any(leftover.iterdir()) and not (leftover / MARKER).is_file():
            continue
        size = sum(p.stat().st_size for p in leftover.rglob("*") if p.is_file() and not p.is_symlink())
        shutil.rmtree(leftover)
        if not quiet:
            print(f"removed {str(leftover)!r} ({size / 1e6:.0f} MB), left by an interrupted conversion",
                  file=sys.stderr, flush=True)


def _move_into_place(work: Path, target: Path) -> None:
    """Rename the finished work folder to target, replacing an (empty or earlier) output."""
    if not target.exists():
        work.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
    target.rename(old)
    work.rename(target)
    shutil.rmtree(old)


def main(src: str, dst: str, model_parallel_size: int = 1, dtype: str = "bf16", force: bool = False) -> None:
    """Convert an HF model directory or a GGUF file into Meta's checkpoint layout.

    Args:
        src: HF model directory (config.json + safetensors + tokenizer) or a .gguf file.
        dst: output directory (must not exist or be empty, unless --force).
        model_parallel_size: number of consolidated.NN.pth shards to write.
        dtype: bf16, fp16 or fp32.
        force: replace an earlier output of llama.convert at dst (never other files).
    """
    out = convert(src, dst, model_parallel_size, dtype, force)
    print(f"wrote {out}")


if __name__ == "__main__":
    from .cli import path_flags, run

    run(path_flags("src", "dst")(main))
