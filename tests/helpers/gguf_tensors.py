"""GGUF tensors as native weights, with no detour through bf16.

    reader = gguf.GGUFReader(path)
    blocks, layout = gguf_weight(reader.tensors[i])   # e.g. uint8 [N, K/32*18], "q4_0"
    layer = NativeLinear(blocks, layout)

Q8_0, Q4_0 and Q4_1 tensors keep their bytes (the native layouts are GGML's); F32 and
BF16 stay as they are and F16 becomes fp32 (exactly). The blocks share the reader's
memory map: nothing is copied, and nothing may write to them.
"""

import warnings
from typing import Tuple

import numpy as np
import torch

from llama.errors import LlamaError

_LAYOUTS = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "F32": "f32", "BF16": "bf16", "F16": "f32"}


def gguf_weight(tensor) -> Tuple[torch.Tensor, str]:
    """(stored weight [N, ...], layout) of a 2-D gguf.ReaderTensor."""
    kind = tensor.tensor_type.name
    if kind not in _LAYOUTS:
        raise LlamaError(f"GGUF tensor {tensor.name!r} is {kind}; the native kernels take "
                         f"{', '.join(sorted(_LAYOUTS))} (dequantize it with the gguf package instead)")
    if len(tensor.shape) != 2:
        raise LlamaError(f"GGUF tensor {tensor.name!r} has shape {list(tensor.shape)}; a weight matrix is 2-D")
    data = np.asarray(tensor.data)
    with warnings.catch_warnings():  # a read-only memory map: the kernels only read it
        warnings.simplefilter("ignore", UserWarning)
        if kind == "BF16":
            stored = torch.from_numpy(data.view(np.uint16)).view(torch.bfloat16)
        elif kind == "F16":
            stored = torch.from_numpy(data).float()
        else:
            stored = torch.from_numpy(data)
    n = int(tensor.shape[1])  # GGML lists dimensions innermost first: (K, N)
    return stored.reshape(n, -1), _LAYOUTS[kind]
