"""The decode backend (llama.runtime.backend.decode_step): PyTorch or the native step, chosen by
timing real steps and cached per machine, software, model and threads; LLAMA_NATIVE=0
forces PyTorch; GGML-quantized models (quantize="q8_0", "q4_0", "q4_1") and where they
are refused."""

import pytest
import torch

from helpers.processes import choices_of_processes_starting_together
from llama import Llama, LlamaError, native
from llama.native.decode import decode_problem
from llama.runtime import backend
from llama.utils import measurements
from llama.utils.measurements import verdict_file

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels here (no compiler)")


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    """Verdicts in a fresh cache (the library stays loaded from wherever it was built)."""
    native.available()
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    monkeypatch.setenv("LLAMA_TUNE", "0")


def _model(tiny_ckpt, sp_tokenizer, dtype="fp32", batch=4, quantize=None):
    return Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=batch, device="cpu",
                       dtype=dtype, quantize=quantize).model


def test_the_key_names_machine_software_model_dtype_threads_and_batch(tiny_ckpt, sp_tokenizer, monkeypatch):
    fp32, bf16 = _model(tiny_ckpt, sp_tokenizer), _model(tiny_ckpt, sp_tokenizer, "bf16")
    key = backend.decode_key(fp32, 1)
    assert key["cpu"] and key["flags"] and key["cores"] and key["torch"] == torch.__version__
    assert key["kernels"] and key["shape"] == [64, 2, 4, 2, 192, 32000] and key["weights"] == "float"
    assert backend.decode_key(bf16, 1)["dtype"] != key["dtype"]
    assert backend.decode_key(fp32, 4)["batch"] == 4
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if saved > 1 else 2)
        assert backend.decode_key(fp32, 1)["threads"] != key["threads"]
    finally:
        torch.set_num_threads(saved)
    assert backend.decode_key(_model(tiny_ckpt, sp_tokenizer, quantize="q4_0"), 1)["weights"] == "q4_0"
    monkeypatch.setenv("LLAMA_KV_CACHE", "bf16")  # the same model on a cache half the size: another verdict
    assert backend.decode_key(_model(tiny_ckpt, sp_tokenizer), 1)["cache"] != key["cache"]


def test_a_moment_of_load_does_not_decide_the_verdict(tiny_ckpt, sp_tokenizer):
    """The first round meets a busy machine (torch's step looks slow); rounds go on until two
    in a row agree, each backend keeping its best time: the verdict is the quiet machine's."""
    model = _model(tiny_ckpt, sp_tokenizer)
    rounds = iter([{"torch": 9.0, "native": 2.0}, {"torch": 1.0, "native": 2.0}, {"torch": 1.1, "native": 2.1}])
    assert backend.choose_decode_backends(model, [2], None, lambda batch: next(rounds)) == {2: "torch"}
    entry = measurements.lookup(verdict_file("decode-backend"), backend.decode_key(model, 2))
    assert entry["rounds"] == 3 and entry["ms"] == {"torch": 1.0, "native": 2.0}


@pytest.mark.parametrize("times, chosen", [({"torch": 1.0, "native": 1.05}, "native"),
                                           ({"torch": 1.0, "native:amx": 1.3, "native:avx512_bf16": 1.08},
                                            "native:avx512_bf16"),
                                           ({"torch": 1.0, "native": 1.2}, "torch")])
def test_pytorch_wins_only_where_clearly_faster(times, chosen, tiny_ckpt, sp_tokenizer):
    """A near tie keeps the native step (a verdict is kept for good, and a busy moment can make
    a tie fall either way); PyTorch's step must take at most 90% of the fastest native one's."""
    model = _model(tiny_ckpt, sp_tokenizer)
    assert backend.choose_decode_backends(model, [2], None, lambda batch: dict(times)) == {2: chosen}


@pytest.mark.parametrize("faster", backend.DECODE_BACKENDS)
def test_the_faster_backend_wins_and_the_verdict_is_kept(faster, tiny_ckpt, sp_tokenizer):
    model = _model(tiny_ckpt, sp_tokenizer)
    asked = []

    def fake(batch):
        asked.append(batch)
        return {name: 1.0 if name == faster else 2.0 for name in backend.DECODE_BACKENDS}

    assert backend.choose_decode_backends(model, [1, 4], None, fake) == {1: faster, 4: faster}
    assert asked == [1, 1, 4, 4]  # two rounds each, which agree

    def never(batch):
        raise AssertionError("measured again although the verdict is cached")

    assert backend.choose_decode_backends(model, [4, 1], None, never) == {1: faster, 4: faster}
    with pytest.raises(AssertionError):  # another thread count is another machine
        saved = torch.get_num_threads()
        torch.set_num_threads(1 if saved > 1 else 2)
        try:
            backend.choose_decode_backends(model, [1], None, never)
        finally:
            torch.set_num_threads(saved)


def test_a_step_follows_the_verdict_of_the_nearest_batch_size():
    step = backend.NativeDecodeStep(None, {1: "native", 16: "torch"})
    assert [step.wants(b) for b in (1, 2, 3, 4, 5, 8, 16, 32, 33)] == \
        [True, True, True, True, False, False, False, False, False]


def test_a_step_runs_the_native_path_its_verdict_names():
    ran = []
    decoders = {name: (lambda *args, name=name: ran.append(name)) for name in ("native:amx", "native:avx512_bf16")}
    step = backend.NativeDecodeStep(decoders, {1: "native:avx512_bf16", 16: "native:amx"})
    for batch in (1, 16, 2):
        step(torch.zeros(batch, dtype=torch.long), None, None)
    assert ran == ["native:avx512_bf16", "native:amx", "native:avx512_bf16"]
    backend.NativeDecodeStep(decoders, {1: "native"})(torch.zeros(1), None, None)  # LLAMA_NATIVE=1: the default
    assert ran[-1] == "native:amx"


def test_bf16_weights_time_both_of_their_native_paths(tiny_ckpt, sp_tokenizer):
    newest = native.paths()[-1]
    assert backend.native_step_paths(_model(tiny_ckpt, sp_tokenizer)) == [newest]  # fp32: one AVX-512 code
    both = backend.native_step_paths(_model(tiny_ckpt, sp_tokenizer, "bf16"))
    assert both == (["amx", "avx512_bf16"] if newest == "amx" else [newest])
    assert backend.native_step_paths(_model(tiny_ckpt, sp_tokenizer, "bf16", quantize="q8_0")) == [newest]


def test_real_timing_is_cached(tiny_ckpt, sp_tokenizer):
    model = _model(tiny_ckpt, sp_tokenizer)
    caches = [(layer.attention.cache.k.clone(), layer.attention.cache.v.clone()) for layer in model.layers]
    step = backend.choose_decode_step(model, 4)
    assert step is not None and set(step.verdicts) == {1, 4}
    for layer, (k, v) in zip(model.layers, caches):  # timing leaves the caches as they were
        assert torch.equal(layer.attention.cache.k, k) and torch.equal(layer.attention.cache.v, v)
    entries = verdict_file("decode-backend").read_text()
    assert '"ms"' in entries and '"native:' in entries


def test_llama_native_0_forces_pytorch(tiny_ckpt, sp_tokenizer, monkeypatch):
    model = _model(tiny_ckpt, sp_tokenizer)
    monkeypatch.setenv("LLAMA_NATIVE", "0")
    assert backend.choose_decode_step(model, 4) is None
    with pytest.raises(LlamaError, match="quantize='q8_0'.*LLAMA_NATIVE=0.*int8"):
        _model(tiny_ckpt, sp_tokenizer, quantize="q8_0")


@pytest.mark.parametrize("layout", ["q8_0", "q4_1"])
def test_ggml_modes_split_across_ranks_hold_the_unsplit_models_blocks(layout, tiny_ckpt, sp_tokenizer):
    """Each rank quantizes its own slice; cut at multiples of 32 input features, a slice's
    blocks are exactly the unsplit weight's (column-parallel: its rows; row-parallel: its
    blocks of each row). Where a rank's slice is not a multiple of 32 wide, it is refused."""
    from helpers.weights import pose_as_rank

    whole = _model(tiny_ckpt, sp_tokenizer, "bf16", quantize=layout).state_dict()
    for rank in range(2):
        with pose_as_rank(rank, 2):
            part = _model(tiny_ckpt, sp_tokenizer, "bf16", quantize=layout).state_dict()
        for name in ("layers.1.attention.wq.kernel.packed", "layers.1.feed_forward.w3.kernel.packed"):
            rows = whole[name].shape[0] // 2
            assert torch.equal(part[name], whole[name][rank * rows:(rank + 1) * rows]), name
        for name in ("layers.1.attention.wo.kernel.packed", "layers.1.feed_forward.w2.kernel.packed"):
            cols = whole[name].shape[1] // 2
            assert torch.equal(part[name], whole[name][:, rank * cols:(rank + 1) * cols]), name

def test_a_ggml_mode_whose_slices_are_not_32_wide_is_refused_naming_the_layer(tmp_path, sp_tokenizer):
    from helpers.weights import pose_as_rank
    from llama.testing import TINY_PARAMS, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "d96", params={**TINY_PARAMS, "dim": 96, "n_heads": 2, "n_kv_heads": 2})
    _model(ckpt, sp_tokenizer, "bf16", quantize="q8_0")  # whole rows of 96: fine
    with pose_as_rank(0, 2), pytest.raises(LlamaError, match=r"quantize='q8_0'.*attention.wo \(48\).*multiple of 32"):
        _model(ckpt, sp_tokenizer, "bf16", quantize="q8_0")


@pytest.mark.parametrize("layout", ["q8_0", "q4_0", "q4_1"])
def test_ggml_modes_hold_blocks_only(layout, tiny_ckpt, sp_tokenizer):
    model = _model(tiny_ckpt, sp_tokenizer, "bf16", quantize=layout)
    wq, out = model.layers[0].attention.wq.kernel, model.output.kernel
    assert isinstance(wq, native.NativeLinear) and wq.layout == layout and wq.packed.dtype == torch.uint8
    assert out.layout == ("q8_0" if layout != "q8_0" else layout)  # 8-bit output, as llama.cpp keeps it
    assert not any(p.dtype != torch.uint8 and p.dim() == 2 and p.shape[0] != 32000
                   for p in model.state_dict().values()), "a float projection is left"
    step = backend.choose_decode_step(model, 4)
    assert step is not None and all(v == "native" for v in step.verdicts.values())


def test_batches_beyond_the_native_kernels_are_not_measured(tiny_ckpt, sp_tokenizer, monkeypatch):
    model = _model(tiny_ckpt, sp_tokenizer, batch=native.MAX_NATIVE_ROWS + 8)
    measured = []
    monkeypatch.setattr(backend, "_time_decode", lambda model, step, batch: measured.append(batch) or {
        "torch": 2.0, "native": 1.0})
    step = backend.choose_decode_step(model, native.MAX_NATIVE_ROWS + 8)
    assert sorted(set(measured)) == [1, native.MAX_NATIVE_ROWS]  # (two rounds each)
    assert step.wants(native.MAX_NATIVE_ROWS) and not step.wants(native.MAX_NATIVE_ROWS + 1)


def test_shapes_the_native_kernels_do_not_take_decode_in_pytorch(tmp_path, sp_tokenizer):
    """An FFN width that is not a multiple of 32 (as in test_hf_parity's models): PyTorch decodes,
    and quantize='q8_0' is refused naming the width."""
    from llama.testing import TINY_PARAMS, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "odd", params={**TINY_PARAMS, "multiple_of": 16})  # 176 wide
    model = Llama.build(str(ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=2, device="cpu").model
    assert "ffn hidden dim 176" in decode_problem(model)
    assert backend.choose_decode_step(model, 2) is None
    with pytest.raises(LlamaError, match=r"feed_forward.w2 \(176\).*multiple of 32"):
        Llama.build(str(ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=2, device="cpu", quantize="q8_0")


def _choose_in_a_process(ckpt: str, tokenizer: str, cache: str, faster: str, both_timing, out) -> None:
    """A process whose own timing favours `faster`; its timing waits (up to 3 s) for the other
    process to be timing too, so both time at once unless one waits for the other's verdict."""
    import os
    import threading

    os.environ.update(LLAMA_CACHE=cache, LLAMA_TUNE="0")
    model = Llama.build(ckpt, tokenizer, max_seq_len=32, max_batch_size=4, device="cpu", dtype="fp32").model

    def fake(batch):
        try:
            both_timing.wait(timeout=3)
        except threading.BrokenBarrierError:
            pass
        return {name: 1.0 if name == faster else 2.0 for name in backend.DECODE_BACKENDS}

    out.put(backend.choose_decode_backends(model, [1], None, fake))


@pytest.mark.subprocess
@pytest.mark.slow
def test_processes_measuring_at_once_choose_alike(tiny_ckpt, sp_tokenizer, tmp_path):
    """Two processes (the ranks of a job) whose own timings disagree, starting together: one
    measures, the other waits for its verdict, and both decode alike."""
    choices = choices_of_processes_starting_together(
        _choose_in_a_process,
        [(str(tiny_ckpt), sp_tokenizer, str(tmp_path), faster) for faster in backend.DECODE_BACKENDS])
    assert choices[0] == choices[1], choices


def test_a_verdict_file_that_cannot_be_written_costs_a_note_not_the_job(tmp_path, monkeypatch, capsys):
    """The kept measurements are a cache: on a full disk the job goes on with the verdicts it
    measured, says so once, and leaves no temporary file behind."""
    import errno
    from pathlib import Path

    from llama.utils import measurements

    real_write = Path.write_text

    def full_disk(self, *args, **kwargs):
        if ".tmp" in self.name:
            real_write(self, "{")  # part of it, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    path = tmp_path / "verdicts.json"
    for _ in range(2):
        got = measurements.kept(path, {"a": {"shape": 1}}, lambda item: {"best": "x"}, "test verdicts")
        assert got["a"]["best"] == "x"
    assert capsys.readouterr().err.count("cannot keep measurements in") == 1
    assert not path.exists() and not list(tmp_path.glob("*.tmp*"))
