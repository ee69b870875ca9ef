"""Multi-GPU set-up without GPUs: the device each rank takes, the dtype each GPU gets, NCCL
bound to the device and set up before the weights load, agreements that free a failed
rank's tensors and wait as long as the work may take, heartbeats while rank 0 works, and the
process group left at a normal exit. Device queries and the backend choice are faked; the
process groups are real (gloo, a world of one)."""

import time
import weakref

import pytest
import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

import llama.runtime.distributed as distributed
from llama import LlamaError
from llama.runtime.devices import choose_device, default_dtype, device_identity, resolve_dtype
from llama.runtime.distributed import (
    FromMainRank,
    all_ranks_agree,
    check_own_devices,
    init_distributed,
    leave_process_group,
    warm_up_groups,
)


def fake_gpus(monkeypatch, count: int) -> None:
    """This machine shows `count` CUDA devices to torch (as torch.accelerator and torch.cuda say)."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *args, **kwargs: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# ---- which device a rank takes (issue 15.5) ----------------------------------------------------

def test_one_gpu_per_local_rank(monkeypatch):
    fake_gpus(monkeypatch, 4)
    assert [choose_device(r, 8, None, 4) for r in range(4)] == [torch.device("cuda", r) for r in range(4)]
    assert choose_device(1, 2, "cuda", 2) == torch.device("cuda", 1)  # named without an index: the same choice


@pytest.mark.parametrize("requested", [None, "cuda"])
def test_more_processes_than_gpus_is_refused_on_every_rank(requested, monkeypatch):
    """local_rank % device_count would put ranks 0 and 2 on one GPU; every rank refuses, the
    ones whose device exists too, so the job ends at once with the reason."""
    fake_gpus(monkeypatch, 2)
    for rank in range(4):
        with pytest.raises(LlamaError, match=r"4 processes on this machine but only 2 cuda devices.*"
                                             r"--nproc_per_node 2"):
            choose_device(rank, 4, requested, 4)


@pytest.mark.parametrize("requested", [None, "cuda"])
def test_one_visible_gpu_per_process_is_device_0(requested, monkeypatch):
    """A launcher that gives each process its own GPU (CUDA_VISIBLE_DEVICES per process) leaves
    each one device: local rank 1 must take cuda:0, the only one it sees, not cuda:1."""
    fake_gpus(monkeypatch, 1)
    assert choose_device(1, 2, requested, 2) == torch.device("cuda", 0)


def test_a_gpu_this_machine_lacks_is_refused(monkeypatch):
    fake_gpus(monkeypatch, 2)
    with pytest.raises(LlamaError, match=r"device='cuda:3': there is no cuda device 3 here \(this machine has 2\)"):
        choose_device(0, 1, "cuda:3", 1)


class _Props:
    def __init__(self, uuid):
        self.uuid = uuid


def test_device_identity_is_the_uuid(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props(f"GPU-{device.index}abc"))
    assert device_identity(torch.device("cuda", 1)) == "cuda GPU-1abc"
    assert device_identity(torch.device("cpu")) is None


def run_ranks(devices, uuids, monkeypatch):
    """check_own_devices on len(devices) ranks (threads) sharing one store; each rank's
    device has the UUID uuids[rank]. Returns what each rank raised (None: nothing)."""
    import threading

    by_thread = {}
    monkeypatch.setattr(distributed, "device_identity",
                        lambda device: by_thread[threading.get_ident()])
    store, outcome = dist.HashStore(), [None] * len(devices)

    def rank_main(rank):
        by_thread[threading.get_ident()] = uuids[rank]
        try:
            check_own_devices(store, rank, len(devices), devices[rank])
        except LlamaError as exc:
            outcome[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(devices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return outcome


def test_ranks_on_one_gpu_are_refused_on_every_rank(monkeypatch):
    """device='cuda:0' given to two ranks, or two ranks whose single visible GPU is the same
    one: both would run on one GPU (NCCL: "Duplicate GPU detected" at the first collective)."""
    cuda0 = torch.device("cuda", 0)
    outcome = run_ranks([cuda0, cuda0, torch.device("cuda", 1)], ["cuda GPU-a", "cuda GPU-a", "cuda GPU-b"], monkeypatch)
    for exc in outcome:
        assert exc is not None and "rank 0 (cuda:0) and rank 1 (cuda:0) would run on one device (cuda GPU-a)" in str(exc)
        assert "one process per device" in str(exc)


def test_ranks_that_each_see_their_own_gpu_as_cuda0_are_fine(monkeypatch):
    cuda0 = torch.device("cuda", 0)
    assert run_ranks([cuda0, cuda0], ["cuda GPU-a", "cuda GPU-b"], monkeypatch) == [None, None]
    assert run_ranks([torch.device("cpu")] * 2, [None, None], monkeypatch) == [None, None]


# ---- the dtype each GPU gets (issue 15.4) ---------------------------------------------------

@pytest.mark.parametrize("native_bf16, expected", [(False, torch.float16), (True, torch.bfloat16)])
def test_gpus_that_only_emulate_bf16_get_fp16(native_bf16, expected, monkeypatch):
    """torch.cuda.is_bf16_supported() says True on V100/T4 (sm70/75), which only emulate bf16;
    asked with including_emulation=False it says whether the hardware has it."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.delenv("LLAMA_DTYPE", raising=False)
    assert default_dtype(torch.device("cuda", 0)) == expected
    assert resolve_dtype(None, torch.device("cuda", 0)) == expected
    assert resolve_dtype("bf16", torch.device("cuda", 0)) == torch.bfloat16  # asked for: given


def test_a_bf16_query_without_the_emulation_argument_answers_for_itself(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert default_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert default_dtype(torch.device("mps")) == torch.float16


# ---- process groups: NCCL bound to the device and set up at once (issue 15.2) ----------------

@pytest.fixture
def fresh_process_group():
    """No process group before the test, none after (the next build makes its own)."""
    leave_process_group()
    yield
    leave_process_group()


def test_nccl_is_bound_to_the_rank_device_and_warmed_up_at_init(fresh_process_group, monkeypatch):
    """With NCCL (faked: the group is really gloo), init_process_group gets device_id, so NCCL
    makes its communicators at once, and every group the model uses is warmed up on that
    device before init_distributed returns, that is before any weight is loaded."""
    cuda1 = torch.device("cuda", 1)
    monkeypatch.setattr(distributed, "choose_device", lambda *args: cuda1)
    monkeypatch.setattr(distributed, "choose_backend", lambda device: "nccl")
    selected, inits, warmed = [], [], []
    monkeypatch.setattr(torch.accelerator, "set_device_index", selected.append)
    real_init = dist.init_process_group

    def init_process_group(backend, **kwargs):
        inits.append((backend, kwargs.pop("device_id", None)))
        real_init("gloo", **kwargs)

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(distributed, "warm_up_groups", lambda device: warmed.append(
        (device, fs_init.model_parallel_is_initialized())))

    ctx = init_distributed(device=None)

    assert inits == [("nccl", cuda1)] and selected == [1] and ctx.device == cuda1 and ctx.backend == "nccl"
    assert warmed == [(cuda1, True)]  # after fairscale's groups exist


def test_gloo_gets_no_device_and_no_warm_up(fresh_process_group, monkeypatch):
    inits, warmed = [], []
    real_init = dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kwargs: (inits.append(kwargs.get("device_id")), real_init(backend, **kwargs)))
    monkeypatch.setattr(distributed, "warm_up_groups", warmed.append)
    assert init_distributed(device="cpu").backend == "gloo"
    assert inits == [None] and warmed == []


def test_warm_up_runs_a_collective_on_the_world_and_the_model_parallel_group(fresh_process_group, monkeypatch):
    init_distributed(device="cpu")
    calls, real = [], dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: (calls.append((group, t.device)), real(t, group=group)))
    warm_up_groups(torch.device("cpu"))
    assert calls == [(dist.group.WORLD, torch.device("cpu")), (fs_init.get_model_parallel_group(), torch.device("cpu"))]


# ---- agreements (issues 15.2 and 15.6) -----------------------------------------------------------

@pytest.fixture
def two_rank_agreement(fresh_process_group, monkeypatch):
    """all_ranks_agree as this rank of a world of two sees it (the collectives are spied on:
    the other rank reports success). Returns the calls: ('barrier', seconds) and ('gather', ...)."""
    init_distributed(device="cpu")
    calls = []
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "monitored_barrier",
                        lambda group, timeout, wait_all_ranks: calls.append(("barrier", timeout.total_seconds())))

    def all_gather_object(reports, mine, group=None):
        calls.append(("gather", group, mine))
        reports[:] = [mine, None]

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    return calls


def test_a_failed_block_frees_its_tensors_before_the_ranks_agree(two_rank_agreement, monkeypatch):
    """What the failed block allocated (say, weights on the GPU when it ran out of memory) is
    freed before the agreement's collective, which may need memory of its own."""
    refs = []

    def build():
        weights = torch.zeros(1000)
        refs.append(weakref.ref(weights))
        raise MemoryError("no room for the model")

    alive_at_gather = []
    real_gather = dist.all_gather_object
    monkeypatch.setattr(dist, "all_gather_object", lambda reports, mine, group=None: (
        alive_at_gather.append(refs[0]() is not None), real_gather(reports, mine, group=group)))
    with pytest.raises(MemoryError) as caught:
        with all_ranks_agree("building the model"):
            build()
    assert alive_at_gather == [False]
    assert caught.value.__traceback__ is not None  # the traceback itself is kept, only its locals go
    assert two_rank_agreement[-1] == ("gather", dist.group.WORLD, "MemoryError: no room for the model")


def test_agreements_wait_as_long_as_the_work_may_take(two_rank_agreement, monkeypatch):
    monkeypatch.setenv("LLAMA_DIST_TIMEOUT", "30")
    with all_ranks_agree("building the model", work_s=500.0):
        pass
    with all_ranks_agree("loading the checkpoint"):
        pass
    assert [c[1] for c in two_rank_agreement if c[0] == "barrier"] == [530.0, 30.0]


def test_a_rank_missing_from_an_agreement_is_named(fresh_process_group, monkeypatch):
    init_distributed(device="cpu")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    def monitored_barrier(group, timeout, wait_all_ranks):
        raise RuntimeError("Ranks 1 failed to pass monitoredBarrier in 330000 ms\nmore detail")

    monkeypatch.setattr(dist, "monitored_barrier", monitored_barrier)
    with pytest.raises(LlamaError, match=r"^not every rank finished building the model within 330 s .*: "
                                         r"Ranks 1 failed to pass monitoredBarrier in 330000 ms$"):
        with all_ranks_agree("building the model", work_s=30.0):
            pass


def test_the_build_allows_for_reading_this_rank_share(tiny_ckpt, sp_tokenizer, monkeypatch):
    """Llama.build's model stage waits for slow ranks as long as reading one rank's share of
    the weights takes at SLOW_READ_BYTES_PER_S."""
    import llama.runtime.loading
    from llama import Llama

    stages, real = [], llama.runtime.loading.all_ranks_agree
    monkeypatch.setattr(llama.runtime.loading, "all_ranks_agree", lambda what, work_s=0.0: (
        stages.append((what, work_s)), real(what, work_s))[1])
    g = Llama.build(str(tiny_ckpt), sp_tokenizer, max_seq_len=16, max_batch_size=1, device="cpu")
    weight_bytes = sum(p.numel() * p.element_size() for p in g.model.parameters())
    assert stages[0] == ("loading the checkpoint", 0.0) and stages[1][0] == "building the model"
    assert stages[1][1] == pytest.approx(weight_bytes / llama.runtime.loading.SLOW_READ_BYTES_PER_S, rel=0.01)


# ---- rank 0 works, the others wait in bounded steps (issue 15.6) ----------------------------------

def protocol(monkeypatch, main: bool, incoming=()):
    """A FromMainRank on a pretend rank of two: what it shares is recorded, what it receives
    is `incoming`, in order; a tick of 20 ms."""
    shared = FromMainRank.__new__(FromMainRank)
    shared.group, shared.tick_s, sent = object(), 0.02, []
    incoming = list(incoming)
    monkeypatch.setattr(distributed, "is_main_rank", lambda: main)
    monkeypatch.setattr(FromMainRank, "_share", lambda self, item: sent.append(item) or (incoming.pop(0) if incoming else item))
    return shared, sent


def test_rank0_sends_heartbeats_while_it_works_then_the_result(monkeypatch):
    shared, sent = protocol(monkeypatch, main=True)
    assert shared.get(lambda: time.sleep(0.3) or ["chunk"], "planning") == ["chunk"]
    assert len(sent) >= 5 and set(sent[:-1]) == {(FromMainRank.WORKING, None)}
    assert sent[-1] == (FromMainRank.DONE, ["chunk"])


def test_rank0_failure_reaches_every_rank_with_its_message(monkeypatch):
    def fail():
        raise LlamaError("line 3 of jobs.jsonl: prompt too long")

    shared, sent = protocol(monkeypatch, main=True)
    with pytest.raises(LlamaError, match="^line 3 of jobs.jsonl: prompt too long$"):
        shared.get(fail, "reading jobs.jsonl")
    assert sent[-1] == (FromMainRank.FAILED, "line 3 of jobs.jsonl: prompt too long")

    other, _ = protocol(monkeypatch, main=False, incoming=[(FromMainRank.WORKING, None), sent[-1]])
    with pytest.raises(LlamaError, match="^rank 0 failed while reading jobs.jsonl: line 3 of jobs.jsonl: prompt too long$"):
        other.get(lambda: pytest.fail("only rank 0 produces"), "reading jobs.jsonl")


def test_other_ranks_return_rank0_result_after_heartbeats(monkeypatch):
    heartbeat = (FromMainRank.WORKING, None)
    other, sent = protocol(monkeypatch, main=False, incoming=[heartbeat, heartbeat, (FromMainRank.DONE, 42)])
    assert other.get(lambda: pytest.fail("only rank 0 produces"), "x") == 42 and len(sent) == 3
    other, _ = protocol(monkeypatch, main=False, incoming=[(FromMainRank.INTERRUPTED, None)])
    with pytest.raises(KeyboardInterrupt):
        other.get(lambda: None, "x")


# ---- leaving (issue 15.6) ------------------------------------------------------------------------

def test_cli_leaves_the_process_group_at_a_normal_exit(fresh_process_group, monkeypatch):
    """Left to interpreter shutdown, torch warns on every NCCL run (and may abort)."""
    from llama.cli import run

    seen = []

    def main():
        init_distributed(device="cpu")
        seen.append(dist.is_initialized())

    monkeypatch.setattr("sys.argv", ["script"])
    run(main)
    assert seen == [True] and not dist.is_initialized() and not fs_init.model_parallel_is_initialized()
