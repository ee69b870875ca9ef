"""params.json, read one way: `load_params(ckpt_dir)` for a checkpoint folder, and
`check_params(params, where)` for values made elsewhere (the converters check what they
write with it). Every value is checked for its kind where it is read (llama.utils.checks),
so a bad one is a LlamaError naming the file and the key, never a TypeError later.

Keys (Meta's): dim, n_layers, n_heads (required), n_kv_heads, vocab_size (-1: from the
tokenizer), multiple_of, ffn_dim_multiplier, norm_eps, rope_theta, use_scaled_rope and
Llama 3.1's rope scaling factors; ours: chat_format and default_system_prompt, which
llama.convert records. Unknown keys are ignored; null means "not set".
"""

import math
from pathlib import Path
from typing import Union

from ..errors import LlamaError
from ..utils.checks import BOOL, STRING, Kind, field, one_of, read_json_object

POSITIVE = Kind("a positive integer", lambda v: type(v) is int and v >= 1)
POSITIVE_REAL = Kind("a positive number", lambda v: type(v) in (int, float) and 0 < v < math.inf)
FROM_TOKENIZER = Kind("-1 (the tokenizer's size)", lambda v: v == -1 and type(v) is int)

# params.json keys the engine reads, by kind.
KINDS = {
    **{key: POSITIVE for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "rope_original_context")},
    "vocab_size": one_of(POSITIVE, FROM_TOKENIZER),
    **{key: POSITIVE_REAL for key in ("ffn_dim_multiplier", "norm_eps", "rope_theta", "rope_scaling_factor",
                                      "rope_low_freq_factor", "rope_high_freq_factor")},
    "use_scaled_rope": BOOL,
    "chat_format": STRING,  # which one: llama.chat_format.make_chat_format
    "default_system_prompt": STRING,
}
REQUIRED = ("dim", "n_layers", "n_heads")


def load_params(ckpt_dir: Union[str, Path]) -> dict:
    """ckpt_dir/params.json as a dict, every key the engine reads checked (check_params)."""
    path = Path(ckpt_dir) / "params.json"
    if path.exists() and not path.is_file():
        raise LlamaError(f"{str(path)!r} is not a regular file (a directory, FIFO or device); "
                         f"replace it with the model's params.json")
    if not path.is_file():
        raise LlamaError(f"{str(path)!r} is missing; a Meta checkpoint directory holds params.json "
                         f"beside its consolidated.NN.pth shards")
    params = read_json_object(path)
    check_params(params, str(path))
    return params


def check_params(params: dict, where: str) -> None:
    """LlamaError naming `where` unless params has the required keys, values of the right
    kind, and heads that split dim into even-sized (rotary) heads."""
    missing = [k for k in REQUIRED if params.get(k) is None]
    if missing:
        raise LlamaError(f"{where!r} lacks required keys {missing}; restore it from the download")
    for key, kind in KINDS.items():
        field(params, key, kind, where, None)
    dim, heads = params["dim"], params["n_heads"]
    kv_heads = params.get("n_kv_heads") or heads
    if dim % heads or (dim // heads) % 2 or heads % kv_heads:
        raise LlamaError(f"{where!r}: dim={dim}, n_heads={heads}, n_kv_heads={kv_heads} do not fit "
                         f"together (dim must be n_heads times an even head size, and n_kv_heads "
                         f"must divide n_heads); fix it or restore the file from the download")
