"""The decode step in fixed shapes, with no host round trip inside it: what a CUDA graph captures.

A step over `rows` cache rows 0..rows-1 (the busy ones and the free ones between them, which
ride along) reading `kv_len` cached positions is the same sequence of kernels every time for
those two numbers, so it is captured once per (rows, kv_len) bucket, powers of two up to
max_batch_size and max_seq_len, and replayed. Its inputs are one packed int64 buffer copied in
per step (tokens, positions, sampling keys, steps, and the temperatures and top_p bit-cast),
and its output one packed float64 buffer (the token, its logprob, whether the logits were
finite, whether the sample is settled) brought back with one device-to-host copy: the step
itself reads nothing on the host (no .item(), .tolist(), bool(tensor), nonzero). Sampling runs
inside it (llama.runtime.sampling.sample_fixed): a row whose nucleus may reach past the 256
most likely tokens is marked unsettled and sampled again by the caller from the logits, which
stay in the step's buffer until the next step.

Where capture is unavailable (the CPU, MPS, model parallelism, no torch.cuda.graphs) the same
code runs eagerly, with the same results: the engine's tests run it on the CPU.
"""

import sys
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from ..model import Transformer
from ..model.parallel import model_parallel_size
from .sampling import sample_fixed, token_logprobs

# Inputs, one row per cache row: token, position, key, step, temperature and top_p (float64 bits).
# Outputs (float64), one column per row: token, logprob, finite (1.0 or 0.0), settled (1.0 or 0.0).
_TOKEN, _POSITION, _KEY, _STEP, _TEMPERATURE, _TOP_P = range(6)
SMALLEST_KV_BUCKET = 64  # positions: short contexts share one graph (reading 64 keys costs little)


class RowInput(NamedTuple):
    """What the step needs of one decoding row."""
    token: int
    position: int
    key: int = 0
    step: int = 0
    temperature: float = 0.0
    top_p: float = 1.0


class RowOutput(NamedTuple):
    token: int
    logprob: float
    finite: bool
    settled: bool


def bucket(n: int, most: int, least: int = 1) -> int:
    """The smallest power of two >= n (and >= least), at most `most`."""
    size = least
    while size < n:
        size *= 2
    return min(size, most)


def graphs_available(model: Transformer) -> bool:
    """Whether this model's decode step can be captured as CUDA graphs here."""
    device = model.norm.weight.device
    return device.type == "cuda" and hasattr(torch.cuda, "CUDAGraph") and model_parallel_size() == 1


class StaticDecodeStep:
    """One decode step per call over cache rows 0..rows-1 (see the module docstring);
    capture=True captures each bucket as a CUDA graph at its first use."""

    def __init__(self, model: Transformer, capture: bool):
        self.model = model
        self.capture = capture
        params = model.params
        self.max_rows, self.max_seq_len = params.max_batch_size, params.max_seq_len
        device = model.norm.weight.device
        self._inputs = torch.zeros(6, self.max_rows, dtype=torch.long, device=device)
        self._host = torch.zeros(6, self.max_rows, dtype=torch.long, pin_memory=device.type == "cuda")
        self._outputs = torch.zeros(4, self.max_rows, dtype=torch.float64, device=device)
        self._logits: Optional[torch.Tensor] = None  # the last step's [rows, V]
        # (rows, kv_len) -> the captured graph and the logits buffer it writes
        self._graphs: Dict[Tuple[int, int], Tuple["torch.cuda.CUDAGraph", torch.Tensor]] = {}
        self._pool = None  # one memory pool shared by every captured bucket
        self.replays = 0  # steps that replayed a captured graph (for tests and reports)
        self.candidates = 256  # the most likely tokens a row's nucleus is sought among (sample_fixed)

    def __call__(self, rows: List[RowInput], kv_len: int) -> List[RowOutput]:
        """Decode one token for each of cache rows 0..len(rows)-1 (a free row: RowInput(0,
        max_seq_len - 1)); kv_len: one more than the largest position a busy row decodes at."""
        count = len(rows)
        size = bucket(count, self.max_rows)
        length = bucket(kv_len, self.max_seq_len, SMALLEST_KV_BUCKET)
        host = self._host
        host.zero_()
        host[_POSITION, count:size] = self.max_seq_len - 1  # rows past the busy ones ride along as free rows
        host[_TOP_P].view(torch.float64)[:] = 1.0
        if count:
            columns = list(zip(*rows))
            host[:_TEMPERATURE, :count] = torch.tensor(columns[:_TEMPERATURE], dtype=torch.long)
            host[_TEMPERATURE:, :count].view(torch.float64)[:] = torch.tensor(columns[_TEMPERATURE:],
                                                                             dtype=torch.float64)
        self._inputs.copy_(host, non_blocking=True)
        self._run(size, length)
        packed = self._outputs[:, :count].tolist()  # the step's one device-to-host copy
        return [RowOutput(int(t), lp, f > 0, s > 0) for t, lp, f, s in zip(*packed)]

    def logits(self, row: int) -> torch.Tensor:
        """The last step's logits [V] of cache row `row` (for a row that is not settled)."""
        return self._logits[row]

    def _run(self, size: int, length: int) -> None:
        if not self.capture:
            self._compute(size, length)
            return
        captured = self._graphs.get((size, length))
        if captured is None:
            try:
                captured = self._graphs[(size, length)] = self._capture(size, length)
            except Exception as exc:  # noqa: BLE001 (any failure to capture: the same step, eagerly)
                self.capture = False
                print(f"llama: the decode step could not be captured as a CUDA graph "
                      f"({type(exc).__name__}: {str(exc)[:200]}); it runs eagerly from now on", file=sys.stderr)
                self._compute(size, length)
                return
        graph, self._logits = captured
        graph.replay()
        self.replays += 1

    def _compute(self, size: int, length: int) -> None:
        """The step's kernels, over the input buffer's first `size` rows, into the output buffer."""
        inputs = self._inputs[:, :size]
        tokens, positions = inputs[_TOKEN].unsqueeze(1), inputs[_POSITION]
        floats = inputs[_TEMPERATURE:].view(torch.float64).float()
        logits = self.model(tokens, positions, kv_len=length, static=True)[:, -1]
        chosen, settled = sample_fixed(logits, floats[0], floats[1], inputs[_KEY], inputs[_STEP],
                                       self.candidates)
        finite = torch.isfinite(logits.sum(dim=-1))
        out = self._outputs[:, :size]
        out[0] = chosen
        out[1] = token_logprobs(logits, chosen)
        out[2] = finite
        out[3] = settled
        self._logits = logits

    def _capture(self, size: int, length: int) -> Tuple["torch.cuda.CUDAGraph", torch.Tensor]:
        """Run the step eagerly on a side stream (warming up what capture must not do for the
        first time: kernel choices, workspaces), then capture it; the caller then replays it.
        The step's writes to the KV cache are the same each time, so running it twice changes
        nothing."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._compute(size, length)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._compute(size, length)
        self._pool = graph.pool()
        return graph, self._logits
