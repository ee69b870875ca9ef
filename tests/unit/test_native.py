"""Native CPU kernels (llama.native): every layout and code path against PyTorch matmuls on
weights dequantized by the gguf package, GGML's byte layouts against gguf's own quantizer,
the concurrency-safe build, and the PyTorch fallback when the library is off."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from helpers import REPO
from llama import native
from llama.errors import LlamaError
from llama.native import build, layouts
from llama.native import kernel_choice as tune
from llama.utils import measurements

QUANTIZED = ["q8_0", "q4_0", "q4_1"]
GGML_TYPE = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0,
             "q4_1": GGMLQuantizationType.Q4_1}

# Waits for "go" on stdin, so that it asks for the library at the same moment as the test.
_RIVAL = textwrap.dedent("""
    import json, sys
    from llama.native import build
    print("ready", flush=True)
    sys.stdin.readline()
    lib = build.load()
    print(json.dumps({"path": lib._name if lib else None, "build_s": build.status()["build_s"]}))
""")


def _status(lib) -> dict:
    return {"path": lib._name if lib else None, "build_s": build.status()["build_s"]}


@pytest.fixture(scope="module")
def concurrent_build(tmp_path_factory):
    """The library as built into an empty cache by this process and another one asking for
    it at the same moment. Skips only where no C++ compiler exists."""
    if build.compiler() is None:
        pytest.skip("no C++ compiler on this machine: only the PyTorch fallback can be tested")
    cache = tmp_path_factory.mktemp("native-cache")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLAMA_CACHE": str(cache), "LLAMA_NATIVE": "1"}
    rival = subprocess.Popen([sys.executable, "-c", _RIVAL], cwd=REPO, env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert rival.stdout.readline().strip() == "ready", rival.stderr.read()
    saved = {k: os.environ.get(k) for k in ("LLAMA_CACHE", "LLAMA_NATIVE")}
    os.environ.update(LLAMA_CACHE=str(cache), LLAMA_NATIVE="1")
    try:
        rival.stdin.write("go\n")
        rival.stdin.flush()
        build.reset()
        ours = _status(build.load())
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    out, err = rival.communicate(timeout=600)
    assert rival.returncode == 0, err
    assert ours["path"], f"a compiler is here but the build failed: {build.status()['reason']}"
    return [ours, json.loads(out.strip().splitlines()[-1])]


@pytest.fixture(autouse=True)
def _no_tuning_at_first_use(monkeypatch):
    monkeypatch.setenv("LLAMA_TUNE", "0")


def test_two_processes_build_once_and_share_it(concurrent_build):
    results = concurrent_build
    assert all(r["path"] for r in results), results
    assert results[0]["path"] == results[1]["path"]
    built = [r["build_s"] for r in results if r["build_s"] is not None]
    assert len(built) == 1, f"exactly one process compiles, the other waits for it: {results}"
    print(f"first build: {built[0]:.1f} s")
    lib_dir = Path(results[0]["path"]).parent
    assert not list(lib_dir.glob("tmp-*")), "the temporary build directory is removed"


def test_kernels_run_on_torchs_thread_team(concurrent_build):
    """The kernels' OpenMP runtime is torch's: its thread count follows torch.set_num_threads
    (a second runtime would keep its own pool and count)."""
    lib = build.load()
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert lib.llama_native_threads() == threads
    finally:
        torch.set_num_threads(saved)


# ---- layouts: GGML's bytes, checked against the gguf package --------------------------------

def _awkward_weights(n: int = 24, k: int = 96, seed: int = 0) -> torch.Tensor:
    """Random rows plus blocks that stress rounding: zeros, one value, a negative extreme,
    an all-equal block, tiny and huge magnitudes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[0, :32] = 0
    w[1, :32] = 0
    w[1, 5] = 3.0
    w[2, :32] = torch.linspace(-7, 3, 32)
    w[3, :32] = 0.25
    w[4] *= 1e-4
    w[5] *= 1e3
    return w


@pytest.mark.parametrize("layout", QUANTIZED)
def test_quantizers_are_bit_exact_with_gguf(layout, concurrent_build):
    w = _awkward_weights()
    expected = quants.quantize(w.numpy(), GGML_TYPE[layout])
    assert native.quantize(w, layout).numpy().tobytes() == expected.tobytes()        # C++
    assert layouts.torch_quantize(w, layout).numpy().tobytes() == expected.tobytes()  # fallback


@pytest.mark.parametrize("layout", QUANTIZED)
def test_dequantizers_read_gguf_blocks(layout, concurrent_build):
    """Every dequantizer (the scalar and AVX-512 code, on either form; PyTorch's) gives gguf's values."""
    weights = _awkward_weights(n=32, seed=1)
    weights[6, 32:64] = float("nan")  # a NaN scale stays NaN in bf16
    with np.errstate(invalid="ignore"):  # gguf casting the NaN block's quants
        blocks = quants.quantize(weights.numpy(), GGML_TYPE[layout])
    expected = torch.from_numpy(quants.dequantize(blocks, GGML_TYPE[layout]))
    packed = torch.from_numpy(blocks)
    torch.testing.assert_close(native.dequantize(packed, layout), expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(layouts.torch_dequantize(packed, layout), expected, rtol=0, atol=0, equal_nan=True)
    paths = [p for p in ("scalar", "avx512") if p in native.paths()]
    assert paths, native.paths()
    for path in paths:
        for form in (layout, layouts.INTERLEAVED[layout]):
            stored = packed if form == layout else native.interleave(packed, form)
            for dtype in (torch.float32, torch.bfloat16):
                got = native._dequantize_into(stored, form, torch.empty(32, 96, dtype=dtype), path)
                torch.testing.assert_close(got, expected.to(dtype), rtol=0, atol=0, equal_nan=True,
                                           msg=f"{path} {form} {dtype}")


# ---- matmul kernels against PyTorch on gguf-dequantized weights -----------------------------

def _gguf_weights(layout: str, n: int, k: int, seed: int):
    """(stored weight, its values as fp32): quantized by gguf, dequantized by gguf."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    if layout in layouts.FLOAT_LAYOUTS:
        packed = w.to(layouts.FLOAT_LAYOUTS[layout])
        return packed, packed.float()
    blocks = quants.quantize(w.numpy(), GGML_TYPE[layout])
    return torch.from_numpy(blocks), torch.from_numpy(quants.dequantize(blocks, GGML_TYPE[layout]))


def _exact_activations(m: int, k: int, seed: int) -> torch.Tensor:
    """x that int8 blocks hold exactly (q * 2^e with |q| <= 127 and 127 in every block), so
    the quantized kernels must match a plain fp32 matmul up to summation order."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (m, k // 32, 32), generator=g).float()
    q[:, :, 0] = 127 * torch.sign(torch.randn(m, k // 32, generator=g))
    scale = 2.0 ** torch.randint(-6, 2, (m, k // 32, 1), generator=g).float()
    return (q * scale).reshape(m, k)


def _paths():
    return ["scalar", "avx2", "avx512", "avx512_bf16", "amx"]


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_kernels_match_pytorch(layout, path, concurrent_build):
    if path not in native.paths():
        pytest.skip(f"this CPU does not run the {path} path")
    interleaved = layouts.is_interleaved(layout)
    if interleaved and path in ("scalar", "avx2"):
        with pytest.raises(LlamaError, match=f"layout '{layout}' runs on the avx512"):
            native.native_linear(torch.randn(1, 64), native.pack(torch.randn(16, 64), layout), layout, path)
        return
    checked = 0
    # odd N (interleaved: N in groups of 16); an odd and an even number of blocks
    shapes = [(48, 96), (80, 320), (16, 1024)] if interleaved else [(37, 96), (67, 320), (4, 1024)]
    for n, k in shapes:
        packed, w = _gguf_weights(layouts.base_layout(layout), n, k, seed=n)
        if interleaved:
            packed = native.interleave(packed, layout)
        for m in (1, 2, 7, 16, 32):
            x = _exact_activations(m, k, seed=m)
            ref = x @ w.T
            y = native.native_linear(x, packed, layout, path)
            torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
            # bf16 activations (exactly representable here), bf16 output
            yb = native.native_linear(x.to(torch.bfloat16), packed, layout, path)
            assert yb.dtype == torch.bfloat16
            torch.testing.assert_close(yb.float(), ref, rtol=8e-3, atol=1e-3 * ref.abs().max().item())
            checked += 1
    assert checked == 15


@pytest.mark.parametrize("layout", QUANTIZED)
def test_quantized_kernels_on_arbitrary_activations(layout, concurrent_build):
    """With x not on the int8 grid, the error is that of quantizing x per block of 32."""
    packed, w = _gguf_weights(layout, 64, 256, seed=3)
    x = torch.randn(5, 256)
    ref = x @ w.T
    for path in native.paths():
        y = native.native_linear(x, packed, layout, path)
        rel = ((y - ref).norm() / ref.norm()).item()
        assert rel < 0.01, (path, rel)


def test_threads_give_the_same_answer(concurrent_build):
    packed, w = _gguf_weights("q4_0", 301, 512, seed=5)
    x = torch.randn(3, 512)
    path = native.paths()[-1]
    one = native.native_linear(x, packed, "q4_0", path, threads=1)
    team = native.native_linear(x, packed, "q4_0", path, threads=0)
    assert torch.equal(one, team)


# ---- the Python API ----------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["bf16", "q4_1"])
def test_native_linear_module_any_rows(layout, concurrent_build):
    w = torch.randn(48, 128)
    layer = native.NativeLinear(w, layout)
    deq = native.dequantize(layer.blocks(), layout)
    assert layer.in_features == 128 and layer.out_features == 48
    for shape in [(1, 1, 128), (2, 3, 128), (2, 40, 128)]:  # decode, small batch, prefill (torch GEMM)
        x = torch.randn(*shape)
        y = layer(x)
        assert y.shape == (*shape[:-1], 48) and y.dtype == x.dtype
        ref = x @ deq.T
        assert ((y - ref).norm() / ref.norm()).item() < 0.01
    # the stored blocks themselves (e.g. a GGUF tensor's bytes) are used as they are
    if layout == "q4_1":
        again = native.NativeLinear(layer.blocks(), layout)
        assert torch.equal(again.packed, layer.packed)


# ---- interleaved forms ---------------------------------------------------------------------

@pytest.mark.parametrize("layout", QUANTIZED)
def test_interleaved_form_is_the_same_blocks(layout, concurrent_build):
    """Interleaving reorders GGML's blocks and undoes exactly; dequantized, both forms give
    gguf's values; every byte moves (a group is not its rows)."""
    form = layouts.INTERLEAVED[layout]
    blocks = torch.from_numpy(quants.quantize(_awkward_weights(n=32, k=96).numpy(), GGML_TYPE[layout]))
    grouped = native.interleave(blocks, form)
    assert grouped.shape == blocks.shape and not torch.equal(grouped, blocks)
    assert torch.equal(native.interleave(grouped, form, inverse=True), blocks)
    expected = torch.from_numpy(quants.dequantize(blocks.numpy(), GGML_TYPE[layout]))
    assert torch.equal(native.dequantize(grouped, form), expected)
    assert torch.equal(native.dequantize(grouped, form, torch.bfloat16), expected.to(torch.bfloat16))
    assert torch.equal(native.dequantize(grouped, form, torch.float16), expected.to(torch.float16))
    with pytest.raises(LlamaError, match="multiple of 16"):
        native.interleave(blocks[:24], form)


def test_native_linear_keeps_the_measured_form(concurrent_build, monkeypatch, tmp_path):
    """On AVX-512 a q4_0 layer is kept interleaved unless its plain form measured clearly faster
    at one row; either way it computes the same product and its state_dict holds GGML's blocks."""
    if "avx512" not in native.paths():
        pytest.skip("only the AVX-512 path reads the interleaved forms")
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    w = torch.randn(64, 128)
    x = torch.randn(3, 128)
    results = {}
    for plain_us, form_us, want in [(None, None, "q4_0x16"), (5.0, 9.0, "q4_0"), (9.0, 5.0, "q4_0x16"),
                                    (9.0, 10.0, "q4_0x16")]:  # a near tie keeps the interleaved form
        tune.forget()
        measured = {"q4_0": plain_us, "q4_0x16": form_us}
        monkeypatch.setattr(tune, "_fastest_us", lambda layout, *args: measured[layout])
        layer = native.NativeLinear(w, "q4_0")
        assert layer.stored == want
        results[want] = layer(x)
        blocks = layer.state_dict()["packed"]
        assert torch.equal(blocks, native.quantize(w, "q4_0"))
        fresh = native.NativeLinear(torch.zeros(64, 128), "q4_0")
        given = {"packed": blocks.clone()}
        fresh.load_state_dict(given)
        assert torch.equal(fresh.packed, layer.packed) and torch.equal(given["packed"], blocks)
    torch.testing.assert_close(results["q4_0x16"], results["q4_0"], rtol=1e-5, atol=1e-5)
    assert native.NativeLinear(torch.randn(40, 128), "q4_0").stored == "q4_0"  # N not in groups of 16
    tune.forget()
    monkeypatch.setenv("LLAMA_INTERLEAVE", "0")
    assert native.NativeLinear(w, "q4_0").stored == "q4_0"
    tune.forget()


def test_bad_input_is_a_llama_error():
    with pytest.raises(LlamaError, match="layout='q3_k'"):
        native.pack(torch.randn(4, 64), "q3_k")
    with pytest.raises(LlamaError, match="multiple of 32"):
        native.pack(torch.randn(4, 40), "q8_0")
    with pytest.raises(LlamaError, match="uint8"):
        native.NativeLinear(torch.zeros(4, 33, dtype=torch.uint8), "q8_0")
    layer = native.NativeLinear(torch.randn(4, 64), "bf16")
    with pytest.raises(LlamaError, match="x has 32 features"):
        layer(torch.randn(1, 32))


# ---- fallback: no library -------------------------------------------------------------------

@pytest.fixture
def native_off(concurrent_build, monkeypatch, tmp_path):
    """Lets a test load the library afresh under other settings; restores it afterwards."""
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    saved = dict(build._state)
    build.reset()
    yield tmp_path
    build.reset()
    build._state.update(saved)


@pytest.mark.parametrize("case", ["disabled", "no compiler", "failed build"])
def test_fallback_to_pytorch(case, native_off, monkeypatch, capsys):
    if case == "disabled":
        monkeypatch.setenv("LLAMA_NATIVE", "0")
    elif case == "no compiler":
        monkeypatch.setenv("CXX", "")
        monkeypatch.setenv("PATH", str(native_off))
    else:
        monkeypatch.setenv("CXX", "/bin/false")
    assert not native.available() and native.paths() == []
    w = torch.randn(40, 64)
    blocks = native.quantize(w, "q4_0")
    expected = quants.quantize(w.numpy(), GGMLQuantizationType.Q4_0)
    assert blocks.numpy().tobytes() == expected.tobytes()
    x = torch.randn(3, 64)
    ref = x @ torch.from_numpy(quants.dequantize(expected, GGMLQuantizationType.Q4_0)).T
    torch.testing.assert_close(native.linear(x, blocks, "q4_0"), ref, rtol=1e-5, atol=1e-5)
    y = native.NativeLinear(w, "bf16")(x.bfloat16())
    torch.testing.assert_close(y.float(), x.bfloat16().float() @ w.bfloat16().float().T, rtol=0.02, atol=0.05)
    assert native.available() is False  # asked again: no second build attempt, no second notice
    notices = [line for line in capsys.readouterr().err.splitlines() if "native CPU kernels are off" in line]
    assert len(notices) == (0 if case == "disabled" else 1)
    if case == "failed build":
        assert "build-failed.log" in notices[0]
        assert list((native_off / "native").glob("*/build-failed.log"))


# ---- tuner ------------------------------------------------------------------------------------

def test_tuner_measures_caches_and_reuses(concurrent_build, monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    tune.forget()
    result = tune.tune("q8_0", 256, 512, 1, torch.bfloat16)
    assert set(result["us"]) == set(tune.candidates("q8_0", torch.bfloat16))
    assert result["best"] == min(result["us"], key=result["us"].get)
    kept = measurements.lookup(measurements.verdict_file("kernels"), tune.verdict_key("q8_0", 256, 512, 1, torch.bfloat16))
    assert kept["best"] == result["best"] and kept["key"]["cpu"] and kept["key"]["torch"] == torch.__version__
    tune.forget()  # a new process: the answer comes from the file
    assert native.best_linear_kernel("q8_0", 256, 512, 1, torch.bfloat16) == result["best"]
    # rows share a bucket; past the native range PyTorch's GEMM runs
    assert tune.verdict_key("q8_0", 256, 512, 3, torch.bfloat16) == tune.verdict_key("q8_0", 256, 512, 4, torch.bfloat16)
    assert native.best_linear_kernel("q8_0", 256, 512, 100, torch.bfloat16) == "onednn"
    tune.forget()


def test_first_use_kernel_timing_is_stable_and_bounded(monkeypatch, tmp_path, capsys):
    """A case is timed in rounds until two agree (a first round that met a busy machine does not
    decide it); and first-use timing stops at its budget, the shapes left taking defaults (not
    kept), said once."""
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    monkeypatch.setenv("LLAMA_TUNE", "1")
    tune.forget()
    rounds = iter([{"native:x": 1.0, "onednn": 9.0}, {"native:x": 5.0, "onednn": 2.0},
                   {"native:x": 6.0, "onednn": 2.5}])
    monkeypatch.setattr(tune, "measure", lambda *args, **kwargs: next(rounds))
    result = tune.tune("q8_0", 256, 512, 1, torch.bfloat16)
    assert result["rounds"] == 3 and result["us"] == {"native:x": 1.0, "onednn": 2.0} and result["best"] == "native:x"

    tune.forget()
    measured = []

    def slow(layout, n, k, m, dtype, weight=None):
        measured.append(n)
        tune._auto_spent[0] += 4.0  # as if each case took 4 s
        return {"native:x": 1.0, "onednn": 2.0}

    monkeypatch.setattr(tune, "measure", slow)
    monkeypatch.setattr(tune, "AUTO_TUNE_BUDGET_S", 10.0)
    kernels = [tune.best_kernel("q8_0", n, 512, 1, torch.bfloat16) for n in (32, 64, 96, 128, 160)]
    assert sorted(set(measured)) == [32, 64]  # 8 s spent after the first, 16 s after the second
    default = tune.default_kernel("q8_0", 1, torch.bfloat16)
    assert kernels[:2] == ["native:x", "native:x"] and kernels[2:] == [default] * 3
    assert capsys.readouterr().err.count("first-use kernel timing stopped") == 1
    tune.forget()


# ---- the fused decode step --------------------------------------------------------------------

def _decode_both_ways(model, steps: int = 5, layout=None, make_step=None):
    """Prefill ragged prompts, then decode `steps` tokens with Transformer.forward and again,
    from the same caches and fed the same tokens, with NativeDecoder (or make_step(model)).
    Returns per step (reference logits, our logits) and the caches after both."""
    from llama.native.decode import NativeDecoder

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 9, 3])
    prompts = torch.randint(0, model.vocab_size, (3, 9), generator=g)
    first = model(prompts, 0, last_index=lengths - 1).float()
    caches = [layer.attention.cache for layer in model.layers]
    after_prefill = [(c.k.clone(), c.v.clone()) for c in caches]
    feeds, ref, logits = [], [], first
    for step in range(steps):
        feeds.append(logits.argmax(-1))
        positions = lengths + step
        logits = model(feeds[-1][:, None], positions, kv_len=int(positions.max()) + 1)[:, -1].float()
        ref.append(logits)
    ref_caches = [(c.k.clone(), c.v.clone()) for c in caches]
    for c, (k, v) in zip(caches, after_prefill):
        c.k.copy_(k)
        c.v.copy_(v)
    decoder = make_step(model) if make_step else NativeDecoder(model, layout)
    ours = [decoder(feeds[step], lengths + step) for step in range(steps)]
    return ref, ours, ref_caches, [(c.k, c.v) for c in caches]


def test_decode_step_equals_transformer_fp32(concurrent_build, tiny_ckpt, sp_tokenizer):
    from llama import Llama

    model = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=3, device="cpu",
                        dtype="fp32").model
    ref, ours, ref_caches, caches = _decode_both_ways(model)
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-4)
    for (rk, rv), (k, v) in zip(ref_caches, caches):
        torch.testing.assert_close(k, rk, rtol=0, atol=1e-5)
        torch.testing.assert_close(v, rv, rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["avx512_bf16", "amx"])  # their own kernels for bf16 weights
def test_decode_step_equals_transformer_bf16(path, concurrent_build, tiny_ckpt, sp_tokenizer):
    from llama import Llama
    from llama.native.decode import NativeDecoder

    if path not in native.paths():
        pytest.skip(f"this CPU does not run the {path} path")
    model = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=3, device="cpu",
                        dtype="bf16").model
    ref, ours, _, _ = _decode_both_ways(model, make_step=lambda m: NativeDecoder(m, path=path))
    for r, o in zip(ref, ours):
        assert torch.equal(o.argmax(-1), r.argmax(-1)), "greedy tokens differ"
        # PyTorch's bf16 logits are rounded to bf16 (steps of 1/16 near 20), ours are not
        torch.testing.assert_close(o, r, rtol=0, atol=0.01 * r.abs().max().item())


def _decode_rows_both_ways(dtype: str, tiny_ckpt, sp_tokenizer, schedule):
    """Prefill 4 ragged prompts into cache rows 0..3 of two copies of the model, then per step
    decode the rows in `schedule` (any subset, any order): the reference feeds every row to
    Transformer.forward (a row not scheduled re-feeds its pending position, rewritten before
    it is ever read), NativeDecoder only the scheduled rows. Yields (rows, reference logits
    of those rows, ours, positions, reference model, our model, our keys before the step)
    per step."""
    from llama import Llama
    from llama.native.decode import NativeDecoder

    models = [Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=4, device="cpu",
                          dtype=dtype).model for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    positions = torch.tensor([5, 9, 3, 7])
    prompts = torch.randint(0, models[0].vocab_size, (4, 9), generator=g)
    pending = [m(prompts, 0, last_index=positions - 1).float().argmax(-1) for m in models][0]
    decoder = NativeDecoder(models[1])
    for rows in schedule:
        rows = torch.tensor(rows)
        before = [layer.attention.cache.k.clone() for layer in models[1].layers]
        ref = models[0](pending[:, None], positions, kv_len=int(positions.max()) + 1)[:, -1].float()
        ours = decoder(pending[rows], positions[rows], rows)
        yield rows, ref[rows], ours, positions.clone(), models[0], models[1], before
        pending[rows] = ours.argmax(-1)
        positions[rows] += 1


RAGGED_SCHEDULE = [[2], [3, 1], [0, 2, 1, 3], [1], [3, 0], [2, 0, 1]]


def test_decode_step_on_any_cache_rows_fp32(concurrent_build, tiny_ckpt, sp_tokenizer):
    """Rows joining and leaving in any order: the logits of the scheduled rows, each row's
    cache and no write to rows not scheduled."""
    for rows, ref, ours, positions, ref_model, our_model, before in _decode_rows_both_ways(
            "fp32", tiny_ckpt, sp_tokenizer, RAGGED_SCHEDULE):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
        others = [r for r in range(4) if r not in rows.tolist()]
        for layer, keys in zip(our_model.layers, before):
            assert torch.equal(layer.attention.cache.k[others], keys[others]), "a row not scheduled was written"
    for a, b in zip(ref_model.layers, our_model.layers):
        for row, pos in enumerate(positions.tolist()):  # slots before the last step's positions
            torch.testing.assert_close(b.attention.cache.k[row, :pos], a.attention.cache.k[row, :pos],
                                       rtol=0, atol=1e-5)
            torch.testing.assert_close(b.attention.cache.v[row, :pos], a.attention.cache.v[row, :pos],
                                       rtol=0, atol=1e-5)


def test_decode_step_on_any_cache_rows_bf16(concurrent_build, tiny_ckpt, sp_tokenizer):
    for rows, ref, ours, *_ in _decode_rows_both_ways("bf16", tiny_ckpt, sp_tokenizer, RAGGED_SCHEDULE):
        assert torch.equal(ours.argmax(-1), ref.argmax(-1)), f"greedy tokens differ on rows {rows.tolist()}"


def test_decode_step_refuses_bad_rows(concurrent_build, tiny_ckpt, sp_tokenizer):
    from llama import Llama
    from llama.native.decode import NativeDecoder

    model = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=4, device="cpu").model
    decoder = NativeDecoder(model)
    two = torch.tensor([1, 2])
    for rows in ([1, 1], [0, 4], [-1, 0]):
        with pytest.raises(LlamaError, match="cache rows"):
            decoder(two, two, torch.tensor(rows))
    with pytest.raises(LlamaError, match="differ in size"):
        decoder(two, two, torch.tensor([0]))


def test_decode_step_on_quantized_weights(concurrent_build, tiny_ckpt, sp_tokenizer):
    from llama import Llama

    model = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=3, device="cpu",
                        dtype="fp32").model
    ref, ours, _, _ = _decode_both_ways(model, steps=3, layout="q8_0")
    for r, o in zip(ref, ours):  # int8 weights and activations through the whole model
        assert ((o - r).norm() / r.norm()).item() < 0.05


def test_torch_compile_step_equals_transformer(tiny_ckpt, sp_tokenizer):
    """The step written for torch.compile (run eagerly here: compiling takes a minute)."""
    import importlib.util

    from helpers import REPO
    from llama import Llama

    spec = importlib.util.spec_from_file_location("torch_compile_step", REPO / "benchmarks" / "torch_compile_step.py")
    torch_compile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_compile_step)
    decode_step = torch_compile_step.eager_decode_step

    model = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=32, max_batch_size=3, device="cpu",
                        dtype="fp32").model
    ref, ours, ref_caches, caches = _decode_both_ways(model, make_step=decode_step)
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-4)
    for (rk, rv), (k, v) in zip(ref_caches, caches):
        torch.testing.assert_close(k, rk, rtol=0, atol=1e-5)


def test_gguf_tensors_are_used_as_they_are(concurrent_build, tmp_path):
    """Blocks written into a GGUF file by the gguf package feed the kernels unchanged."""
    import gguf

    from helpers.gguf_tensors import gguf_weight

    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(7)).numpy()
    writer = gguf.GGUFWriter(str(tmp_path / "w.gguf"), "llama")
    for kind in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                 GGMLQuantizationType.Q5_0):
        writer.add_tensor(kind.name, quants.quantize(w, kind), raw_dtype=kind)
    writer.add_tensor("F16", w.astype("float16"))
    writer.add_tensor("norm", w[0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    x = _exact_activations(3, 96, seed=1)
    for tensor in gguf.GGUFReader(str(tmp_path / "w.gguf")).tensors:
        if tensor.name in ("Q5_0", "norm"):
            with pytest.raises(LlamaError, match=tensor.name):
                gguf_weight(tensor)
            continue
        blocks, layout = gguf_weight(tensor)
        values = torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type)).reshape(40, 96).float()
        y = native.NativeLinear(blocks, layout)(x)
        ref = x @ values.T
        torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
