"""Which device and dtype this process runs on: the accelerator of its local rank, else MPS
(one process only), else the CPU, or the one asked for, checked to exist here; and the
model dtype, asked for or the device's default. The CPU's own identity (model, flags) is
read in llama.utils.cpu, which the native build and the measured choices key on too."""

from typing import Optional, Union

import torch

from .. import settings
from ..errors import LlamaError
from ..model.args import DTYPES
from ..utils.cpu import cpu_flags


def choose_device(local_rank: int, world_size: int, requested: Union[str, torch.device, None] = None,
                  local_world_size: Optional[int] = None) -> torch.device:
    """The accelerator of this local rank if there is one, else MPS (one process only), else
    CPU. local_world_size: the processes on this machine (torchrun's LOCAL_WORLD_SIZE)."""
    local_world_size = local_world_size or local_rank + 1
    if requested is not None:
        return _requested_device(requested, local_rank, local_world_size)
    if torch.accelerator.is_available():
        accel = torch.accelerator.current_accelerator()
        if accel is not None and accel.type != "mps":
            index = _local_device_index(accel.type, local_rank, local_world_size, torch.accelerator.device_count())
            return torch.device(accel.type, index)
        if accel is not None and world_size == 1:
            return torch.device("mps")
    return torch.device("cpu")


def _local_device_index(device_type: str, local_rank: int, local_world_size: int, count: int) -> int:
    """One device per process on this machine: local rank r takes device r. With more
    processes than visible devices that is impossible (two NCCL ranks on one GPU fail at their
    first collective), unless each process sees a single device of its own (a launcher that
    sets CUDA_VISIBLE_DEVICES per process): then it is device 0, and check_own_devices makes
    sure no two ranks got the same one."""
    if local_world_size <= count:
        return local_rank
    if count == 1:
        return 0
    raise LlamaError(f"{local_world_size} processes on this machine but only {count} {device_type} devices: each "
                     f"process needs a device of its own; start at most {count} per machine (torchrun "
                     f"--nproc_per_node {count}), or pass device='cpu'")


def _requested_device(requested: Union[str, torch.device], local_rank: int, local_world_size: int) -> torch.device:
    """torch.device(requested), checked to exist on this machine; an accelerator named
    without an index is this local rank's, as in the automatic choice."""
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise LlamaError(f"device={requested!r} is not a device; use e.g. 'cpu', 'cuda', 'cuda:1' or "
                         f"'mps', or leave it out to choose automatically") from None
    if device.type == "cpu":
        return device
    module = getattr(torch, device.type, None)
    if module is None or not getattr(module, "is_available", lambda: False)():
        raise LlamaError(f"device={requested!r}: this machine (or this build of torch) has no "
                         f"{device.type} device; use device='cpu', or leave it out to choose automatically")
    count = getattr(module, "device_count", lambda: 1)()
    if device.index is None and device.type != "mps":
        device = torch.device(device.type, _local_device_index(device.type, local_rank, local_world_size, count))
    if device.index is not None and device.index >= count:
        raise LlamaError(f"device={requested!r}: there is no {device.type} device {device.index} here "
                         f"(this machine has {count}); name one from 0 to {count - 1}")
    return device


def device_identity(device: torch.device) -> Optional[str]:
    """A name for the physical device, the same in every process that uses it (its UUID, which
    per-process device visibility does not change); None for the CPU, or where unknown."""
    module = getattr(torch, device.type, None)
    if device.type == "cpu" or module is None or not hasattr(module, "get_device_properties"):
        return None
    uuid = getattr(module.get_device_properties(device), "uuid", None)
    return f"{device.type} {uuid}" if uuid else None


# ---- dtypes --------------------------------------------------------------------------------


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic (x86 AVX512-BF16/AMX, ARM BF16), where bf16 halves
    the memory traffic of decoding at little cost; elsewhere bf16 is emulated and slow."""
    return bool(set(cpu_flags()) & {"avx512_bf16", "amx_bf16", "bf16"})


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on accelerators: bf16 where the device computes in it natively, else
    fp16; bf16 on CPUs with native bf16, fp32 on other CPUs."""
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if accelerator_has_native_bf16(device) else torch.float16


def accelerator_has_native_bf16(device: torch.device) -> bool:
    """Whether `device` (the current device of its type: init_distributed made it so) runs
    bf16 in hardware. torch's is_bf16_supported() also says yes where bf16 is only emulated
    through fp32 (CUDA GPUs before sm80: V100, T4), far slower there than fp16, unless asked
    with including_emulation=False; a device module whose query lacks that argument answers
    for itself."""
    module = getattr(torch, device.type, None)
    query = getattr(module, "is_bf16_supported", None)
    if query is None:
        return False
    try:
        return bool(query(including_emulation=False))
    except TypeError:
        return bool(query())


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """The model dtype: `dtype` (a DTYPES name, torch's name for it, or the torch dtype),
    else LLAMA_DTYPE (a default for scripts that pass none), else default_dtype(device)."""
    if dtype is None:
        dtype = settings.get("LLAMA_DTYPE")
    if dtype is None:
        return default_dtype(device)
    chosen = (DTYPES.get(dtype) or getattr(torch, dtype, None)) if isinstance(dtype, str) else dtype
    if not isinstance(chosen, torch.dtype) or chosen not in DTYPES.values():
        raise LlamaError(f"dtype={dtype!r} (or LLAMA_DTYPE) is not supported; use one of fp32, bf16, fp16")
    return chosen
