"""A whole decode step of a Transformer in one native call (CPU, model-parallel size 1).

    decoder = NativeDecoder(model)                  # after model.setup_caches(...)
    logits = decoder(tokens, positions)             # tokens, positions: [B] -> logits [B, V]
    logits = decoder(tokens, positions, rows)       # token b in cache row rows[b]

is `model(tokens[:, None], positions, slots=rows)[:, -1]` without Python or per-op dispatch between the
~45 small operations of each layer (see csrc/decode.cpp). It reads the model's own
weights, rotary table and KV caches (`layers[i].attention.cache.k/v`, fp32 or bf16 [B, S, K, D]),
so prefill can stay in PyTorch and decode continue here on the same caches. With
`layout="q8_0"` (or "q4_0", "q4_1") the projections run on quantized copies; projections
whose product already is a NativeLinear (a model quantized to blocks by llama.model.quantize)
are used as they are, blocks and all. The step holds no collective: it runs a whole model,
at model-parallel size 1 only.

The model is read by its attributes (Meta's module names), never imported: this package is
mechanism below the model.
"""

import ctypes
from typing import List, Optional

import torch

from ..errors import LlamaError
from . import _DTYPE_IDS, BLOCK, PATHS, NativeLinear, _lib, pack, paths, problem
from .layouts import LAYOUT_IDS, check_layout, in_features

_PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class _Matrix(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("layout", ctypes.c_int32), ("path", ctypes.c_int32)]


class _Layer(ctypes.Structure):
    _fields_ = ([("attention_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p)]
                + [(name, _Matrix) for name in _PROJECTIONS]
                + [("cache_k", ctypes.c_void_p), ("cache_v", ctypes.c_void_p)])


class _Model(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_int64) for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                                       "hidden", "vocab", "max_batch", "max_seq")]
                + [("norm_eps", ctypes.c_float), ("param_dtype", ctypes.c_int32), ("act_dtype", ctypes.c_int32),
                   ("tok_embeddings", ctypes.c_void_p), ("norm", ctypes.c_void_p), ("output", _Matrix),
                   ("rope", ctypes.c_void_p), ("layers", ctypes.POINTER(_Layer)), ("cache_dtype", ctypes.c_int32),
                   ("path", ctypes.c_int32)])


def decode_problem(model) -> Optional[str]:
    """Why the native decode step cannot run `model` (a llama.model.Transformer) here, or
    None when it can."""
    weight = model.norm.weight
    found = problem(weight.device, weight.dtype)
    if found is not None:
        return found
    attention = model.layers[0].attention
    if attention.n_local_heads != model.params.n_heads:
        return "the model is split across ranks; the native decode step runs at model-parallel size 1"
    p = model.params
    widths = {"dim": p.dim, "n_heads * head_dim": p.n_heads * p.head_dim, "ffn hidden dim": p.ffn_hidden_dim}
    odd = [f"{name} {width}" for name, width in widths.items() if width % BLOCK]
    if odd:
        return f"the model's {', '.join(odd)} not a multiple of {BLOCK}, which the native kernels need"
    if p.head_dim % 2 or p.head_dim > 512:
        return f"head_dim {p.head_dim} is odd or above 512, which the native decode step does not take"
    cache = attention.cache
    if cache is None or cache.k.dtype not in _DTYPE_IDS:
        return "the model has no fp32 or bf16 KV cache (call setup_caches)"
    if not torch.is_complex(model.rope):
        return "the model's rotary table is real-valued (the MPS form); the native step reads the complex one"
    kernel = attention.wq.kernel
    if kernel is not None and not isinstance(kernel, NativeLinear):
        return (f"the model's projections are {type(kernel).__name__} (quantize='int8' has its own "
                f"kernel); the native step reads float or GGML-quantized ones")
    return None


class NativeDecoder:
    """One native call per decode step for `model` (see the module docstring).

    layout: None to use the model's weights as they are (fp32 or bf16, or the blocks of
        NativeLinear projections), else a quantized layout for the projections and the output.
    path: the native code path ("avx512_bf16", ...); default: the newest this CPU runs.
    threads: 0 for torch's thread team, 1 for the calling thread only.
    The model must stay as it is (no setup_caches() again) while the decoder is used.
    """

    def __init__(self, model, layout: Optional[str] = None, path: Optional[str] = None, threads: int = 0):
        found = decode_problem(model)
        if found is not None:
            raise LlamaError(f"NativeDecoder cannot run this model here: {found}; decode with the PyTorch model")
        lib = _lib()
        weight, first = model.norm.weight, model.layers[0].attention
        if layout is not None:
            check_layout(layout)
        self.path = path or paths()[-1]
        if self.path not in paths():
            raise LlamaError(f"path={self.path!r} is not a native code path of this CPU ({', '.join(paths())})")
        self.model, self.threads = model, threads
        self._keep: List[torch.Tensor] = []  # everything the native side points into
        dtype = weight.dtype
        p, cache = model.params, first.cache
        self._model = _Model(
            dim=p.dim, n_layers=p.n_layers, n_heads=p.n_heads, n_kv_heads=p.kv_heads, head_dim=p.head_dim,
            hidden=p.ffn_hidden_dim, vocab=model.vocab_size,
            max_batch=cache.k.shape[0], max_seq=cache.k.shape[1], norm_eps=p.norm_eps,
            param_dtype=_DTYPE_IDS[dtype], act_dtype=_DTYPE_IDS[dtype],
            tok_embeddings=self._pointer(model.tok_embeddings.weight), norm=self._pointer(model.norm.weight),
            output=self._matrix(model.output, layout), rope=self._pointer(torch.view_as_real(model.rope)),
            cache_dtype=_DTYPE_IDS[cache.k.dtype], path=PATHS.index(self.path))
        self._layers = (_Layer * p.n_layers)()
        for spec, block in zip(self._layers, model.layers):
            spec.attention_norm = self._pointer(block.attention_norm.weight)
            spec.ffn_norm = self._pointer(block.ffn_norm.weight)
            for name in _PROJECTIONS:
                owner = block.attention if name in ("wq", "wk", "wv", "wo") else block.feed_forward
                setattr(spec, name, self._matrix(getattr(owner, name), layout))
            spec.cache_k = self._pointer(block.attention.cache.k)
            spec.cache_v = self._pointer(block.attention.cache.v)
        self._model.layers = self._layers
        self._step = lib.llama_decode_step
        self._step.argtypes = [ctypes.POINTER(_Model), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]

    def _pointer(self, tensor: torch.Tensor) -> int:
        if not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise LlamaError("NativeDecoder needs contiguous CPU tensors")
        self._keep.append(tensor)
        return tensor.data_ptr()

    def _matrix(self, module: torch.nn.Module, layout: Optional[str]) -> _Matrix:
        """A projection (a parallel linear layer at size 1) as the native side reads it."""
        kernel = getattr(module, "kernel", None)
        if isinstance(kernel, NativeLinear):
            if layout is not None:
                raise LlamaError(f"the model's projections are {kernel.layout} already; pass layout=None")
            name, stored = kernel.stored, kernel.packed  # blocks in the form they are kept in
        elif kernel is not None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise LlamaError(f"NativeDecoder runs float or GGML-quantized (q8_0, q4_0, q4_1) projections; "
                             f"this model has {type(kernel or module).__name__} ones")
        else:
            weight = module.weight.detach()
            name = layout or {torch.float32: "f32", torch.bfloat16: "bf16"}[weight.dtype]
            stored = pack(weight, name)
        return _Matrix(w=self._pointer(stored), n=stored.shape[0], k=in_features(name, stored),
                       layout=LAYOUT_IDS[name], path=PATHS.index(self.path))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor,
                 rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens, positions, rows: [B] (one new token per cache row, each at its own position;
        rows distinct, default 0..B-1) -> fp32 logits [B, V]."""
        tokens = tokens.reshape(-1).to(torch.int64).contiguous()
        positions = positions.reshape(-1).to(torch.int64).contiguous()
        if rows is not None:
            rows = rows.reshape(-1).to(torch.int64).contiguous()
        if tokens.shape != positions.shape or (rows is not None and rows.shape != tokens.shape):
            raise LlamaError(f"tokens {list(tokens.shape)}, positions {list(positions.shape)} and rows "
                             f"{None if rows is None else list(rows.shape)} differ in size")
        logits = torch.empty(tokens.shape[0], self._model.vocab, dtype=torch.float32)
        rc = self._step(ctypes.byref(self._model), tokens.shape[0], tokens.data_ptr(), positions.data_ptr(),
                        None if rows is None else rows.data_ptr(), logits.data_ptr(), self.threads)
        if rc != 0:
            raise LlamaError(f"decode step refused: batch {tokens.shape[0]} (max {self._model.max_batch}), "
                             f"positions {positions.tolist()} (max {self._model.max_seq - 1}), cache rows "
                             f"{'0..B-1' if rows is None else rows.tolist()} (distinct, below "
                             f"{self._model.max_batch}), token ids below {self._model.vocab}")
        return logits
