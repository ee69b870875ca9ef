"""Helpers of the test suite, shared by its tests: tiny checkpoints and foreign models
(weights, foreign, family, steering), real processes (processes, workers/), a loopback fake of
Meta's download server (download_server), GGUF tensors as native weights (gguf_tensors)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The timing line the CLIs print after each generation (GenerationStats.summary()).
TIMING_LINE = re.compile(r"\[(\d+) prompt tokens, (\d+) generated, [\d.]+ tokens/s, first token after \d+ ms\]")
