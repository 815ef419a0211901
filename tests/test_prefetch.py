"""Prefetcher: the same minibatches as sampling directly, dtypes kept, the buffer's lock honoured, exceptions raised
in the owner's thread, and a thread that close() joins."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from robot_rl.buffer import ReplayBuffer, sample_utd_batches
from robot_rl.config import AgentConfig
from robot_rl.prefetch import Prefetcher, to_tensors

ACT = 3
SPEC = {"ee_pose": ((6,), "float32"), "front": ((8, 8, 3), "uint8"), "wrist": ((8, 8, 3), "uint8")}
CFG = AgentConfig(utd=3, batch_size=16)


def numbered_chunk(first: int, n: int) -> dict:
    """One episode's rows whose contents all derive from the step number t, so that a batch can be checked:
    obs ee_pose[0] = t, next_obs ee_pose[0] = t + 1, action[0] = t, images filled with t % 256."""
    t = np.arange(first, first + n + 1)
    states = {
        "ee_pose": np.repeat(t[:, None], 6, axis=1).astype(np.float32),
        "front": np.broadcast_to((t % 256).astype(np.uint8)[:, None, None, None], (n + 1, 8, 8, 3)).copy(),
        "wrist": np.broadcast_to((t % 256).astype(np.uint8)[:, None, None, None], (n + 1, 8, 8, 3)).copy(),
    }
    return {
        "obs": {k: v[:-1] for k, v in states.items()},
        "next_obs": {k: v[1:] for k, v in states.items()},
        "actions": np.repeat(t[:-1, None], ACT, axis=1).astype(np.float32),
        "rewards": np.zeros(n, np.float32),
        "terminated": np.zeros(n, bool),
        "truncated": np.zeros(n, bool),
    }


def filled_buffer(n: int = 40) -> ReplayBuffer:
    buf = ReplayBuffer(1000, SPEC, ACT)
    buf.add_many(**numbered_chunk(0, n))
    return buf


def assert_consistent(batch: dict) -> None:
    """Every row is one whole transition as added (no half-written or mixed rows)."""
    t = batch["obs"]["ee_pose"][:, 0]
    torch.testing.assert_close(batch["next_obs"]["ee_pose"][:, 0], t + 1)
    torch.testing.assert_close(batch["actions"][:, 0], t)
    for key in ("front", "wrist"):
        assert torch.equal(batch["obs"][key][:, 0, 0, 0], (t.long() % 256).to(torch.uint8))
        assert torch.equal(batch["next_obs"][key][:, 7, 7, 2], ((t.long() + 1) % 256).to(torch.uint8))


def test_batches_equal_direct_sampling_with_the_same_rng_and_keep_dtypes():
    buf = filled_buffer()
    rng = np.random.default_rng(7)
    with Prefetcher(lambda: sample_utd_batches(buf, None, CFG, rng), "cpu", threading.Lock(), depth=2) as prefetch:
        got = [prefetch.get(timeout=10) for _ in range(5)]
    direct_rng = np.random.default_rng(7)
    for step in got:
        assert len(step) == CFG.utd
        for batch, expected in zip(step, sample_utd_batches(buf, None, CFG, direct_rng), strict=True):
            for part in ("obs", "next_obs"):
                for key, (shape, dtype) in SPEC.items():
                    tensor = batch[part][key]
                    assert tensor.dtype == getattr(torch, dtype) and tensor.shape == (CFG.batch_size, *shape)
                    assert tensor.device.type == "cpu"
                    np.testing.assert_array_equal(tensor.numpy(), getattr(expected, part)[key])
            for name in ("actions", "rewards", "terminated", "bc_actions"):
                np.testing.assert_array_equal(batch[name].numpy(), getattr(expected, name))
            assert batch["terminated"].dtype == torch.bool and batch["rewards"].dtype == torch.float32


def test_sampling_holds_the_owners_lock_while_the_owner_adds():
    buf = filled_buffer(10)
    lock = threading.Lock()
    rng = np.random.default_rng(0)
    held = []

    def sample():
        held.append(lock.locked())
        return sample_utd_batches(buf, None, CFG, rng)

    with Prefetcher(sample, "cpu", lock, depth=3) as prefetch:
        first = 11
        for _ in range(60):
            with lock:
                buf.add_many(**numbered_chunk(first, 7))
            first += 8
            for batch in prefetch.get(timeout=10):
                assert_consistent(batch)
    assert held and all(held)


def test_an_exception_in_the_thread_is_raised_by_get_after_the_earlier_batches():
    buf = filled_buffer()
    rng = np.random.default_rng(0)
    calls = []

    def sample():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("sampling failed on purpose")
        return sample_utd_batches(buf, None, CFG, rng)

    prefetch = Prefetcher(sample, "cpu", threading.Lock(), depth=4)
    prefetch.start()
    try:
        assert len(prefetch.get(timeout=10)) == CFG.utd
        assert len(prefetch.get(timeout=10)) == CFG.utd
        with pytest.raises(RuntimeError, match="on purpose"):
            prefetch.get(timeout=10)
        with pytest.raises(RuntimeError, match="on purpose"):
            prefetch.get(timeout=0.01)  # still raised, not a timeout
        assert len(calls) == 3  # the thread stopped at its failure
    finally:
        prefetch.close()


def test_close_joins_the_thread_even_when_the_queue_is_full():
    buf = filled_buffer()
    rng = np.random.default_rng(0)
    prefetch = Prefetcher(lambda: sample_utd_batches(buf, None, CFG, rng), "cpu", threading.Lock(), depth=2)
    prefetch.start()
    deadline = time.monotonic() + 10
    while not prefetch._queue.full() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert prefetch._queue.full()  # the thread now waits to put its third step
    t0 = time.monotonic()
    prefetch.close()
    assert time.monotonic() - t0 < 2
    assert not any(t.name == "prefetch" for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="open"):
        prefetch.get(timeout=1)


def test_get_times_out_and_refuses_before_start():
    release = threading.Event()

    def blocked():
        release.wait(10)
        return []

    prefetch = Prefetcher(blocked, "cpu", threading.Lock())
    with pytest.raises(RuntimeError, match="started"):
        prefetch.get(timeout=1)
    prefetch.start()
    try:
        with pytest.raises(TimeoutError):
            prefetch.get(timeout=0.05)
    finally:
        release.set()
        prefetch.close()
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(blocked, "cpu", threading.Lock(), depth=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_arrive_on_the_device_with_their_dtypes():
    buf = filled_buffer()
    rng = np.random.default_rng(3)
    with Prefetcher(lambda: sample_utd_batches(buf, None, CFG, rng), "cuda", threading.Lock()) as prefetch:
        steps = [prefetch.get(timeout=30) for _ in range(4)]
    direct_rng = np.random.default_rng(3)
    for step in steps:
        for batch, expected in zip(step, sample_utd_batches(buf, None, CFG, direct_rng), strict=True):
            assert batch["obs"]["front"].is_cuda and batch["obs"]["front"].dtype == torch.uint8
            assert_consistent(batch)
            np.testing.assert_array_equal(batch["next_obs"]["wrist"].cpu().numpy(), expected.next_obs["wrist"])
            np.testing.assert_array_equal(batch["bc_actions"].cpu().numpy(), expected.bc_actions)


def test_to_tensors_keeps_every_field_and_key():
    batch = filled_buffer().take(np.arange(5))
    tensors = to_tensors(batch, "cpu")
    assert set(tensors) == {"obs", "next_obs", "actions", "rewards", "terminated", "bc_actions"}
    assert set(tensors["obs"]) == set(tensors["next_obs"]) == set(SPEC)
    assert torch.isnan(tensors["bc_actions"]).all()  # no BC proposal was stored


def test_step_sampler_samples_in_place_or_through_a_thread_started_on_first_use():
    from robot_rl.prefetch import StepSampler

    calls = []

    def sample_fn():
        calls.append(len(calls))
        return [len(calls)]

    plain = StepSampler(sample_fn, "cpu", prefetch=False)
    assert plain.next() == [1] and plain.next() == [2]  # the very lists sample_fn made, in order
    plain.close()
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    buf = filled_buffer()
    before = threading.active_count()
    threaded = StepSampler(lambda: [buf.sample(8, rng_a)], "cpu", prefetch=True)
    time.sleep(0.2)
    assert threading.active_count() == before  # nothing started before the first next()
    for _ in range(3):
        got = threaded.next()[0]
        want = buf.sample(8, rng_b)
        np.testing.assert_array_equal(got["actions"].numpy(), want.actions)
        np.testing.assert_array_equal(got["obs"]["front"].numpy(), want.obs["front"])
    assert threading.active_count() == before + 1
    threaded.close()
    threaded.close()  # idempotent
    assert threading.active_count() == before


def test_a_buffer_with_a_device_copy_is_sampled_in_place_even_with_prefetch_on():
    """train.prefetch applies to host-memory buffers: a device copy is gathered in the loop's thread, from the
    loop's own rng, so the run reproduces exactly; no thread starts."""
    from robot_rl.config import RunConfig
    from robot_rl.prefetch import learner_sampler

    cfg = RunConfig.model_validate({"agent": {"utd": 2, "batch_size": 8}, "train": {"prefetch": True}})
    buf = ReplayBuffer(1000, SPEC, ACT, device="cpu")
    buf.add_many(**numbered_chunk(0, 40))
    before = threading.active_count()
    sampler = learner_sampler(buf, None, cfg, np.random.default_rng(5), "cpu")
    batches = sampler.next()
    assert threading.active_count() == before
    want = sample_utd_batches(buf, None, cfg.agent, np.random.default_rng(5))
    assert len(batches) == 2
    for got, expected in zip(batches, want, strict=True):
        assert_consistent(got)
        assert torch.equal(got["actions"], expected["actions"])
    sampler.close()
