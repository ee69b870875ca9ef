"""GGUF files of the llama architecture to Meta's names and layout (their q/k rows already
are in Meta's order): the tensors dequantized by the gguf package, the metadata checked
field by field, the tokenizer written out as an HF tokenizer.json (gguf_tokenizer)."""

import json
import math
from pathlib import Path
from typing import Dict, Tuple

import torch

from ...errors import LlamaError
from ...model.args import ModelArgs
from ...model.rotary import rope_frequencies
from ...utils.checks import BOOL, INT, POSITIVE_INT, POSITIVE_NUMBER, STRING, Kind, field, list_of
from ...utils.progress import progress
from ..params import check_params
from .hf import chat_format_from_template

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
    name, system = chat_format_from_template(get("tokenizer.chat_template", STRING, ""))
    if name:
        params["chat_format"] = name
    if system:
        params["default_system_prompt"] = system
    return weights, params


def _llama31_scaling_from_factors(factors: torch.Tensor, params: dict) -> dict:
    """GGUF stores Llama 3.1 rotary scaling as per-frequency divisors; find the settings
    (factor 8 as in Llama 3.1, or 32 as in Llama 3.2) that reproduce them."""
    base = ModelArgs.from_params(params)
    for factor in (8.0, 32.0, 16.0, 4.0):
        scaled = ModelArgs.from_params({**params, "use_scaled_rope": True, "rope_scaling_factor": factor})
        ratio = rope_frequencies(base) / rope_frequencies(scaled)
        if torch.allclose(ratio, factors.float(), rtol=1e-3):
            return {"use_scaled_rope": True, "rope_scaling_factor": factor}
    raise LlamaError("this GGUF file uses a rotary scaling this engine does not recognise")
