"""The model actor's engine loop (`workers.generate.EngineLoop`): calls in flight at once share one
running continuous batch. Rows of a later call join while an earlier call's rows still decode and
every row still gives its batch-of-1 output; a failing row fails alone; a broken device fails every
pending row and every later call."""
from __future__ import annotations

import threading

import pytest
import torch

from workers.generate import EngineLoop
from workers.modeling.api import GenerationRequest, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.keep_rule import KeepRule
from workers.modeling.scheduler import ContinuousScheduler, SchedulerConfig, SchedulerStats

from engine_helpers import patterned_image

SAMPLING = SamplingParams(max_new_tokens=12)
pytestmark = pytest.mark.usefixtures("one_thread")


def _requests(count: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        w, h = [28 * int(v) for v in torch.randint(2, 6, (2,), generator=gen)]
        out.append(GenerationRequest(images=(patterned_image(w, h, seed + i),), prompt=f"Describe shape {i}.",
                                     max_new_tokens=int(torch.randint(3, 12, (), generator=gen))))
    return out


@pytest.fixture
def engine(tiny_model, tiny_processor, tiny_modules):
    return GlimpseEngine(tiny_model, tiny_processor, tiny_modules, KeepRule(threshold=0.5, min_remain_num=2))


def _loop(engine, stats=None, max_rows=8):
    return EngineLoop(ContinuousScheduler(engine, SchedulerConfig(kv_budget_tokens=10**9, max_rows=max_rows, prefill_tokens=600),
                                          stats), SAMPLING)


def _gate(loop, monkeypatch) -> threading.Event:
    """Hold the loop's first step until the returned event is set, so the test (not the OS scheduler)
    decides which calls have submitted by then: the first call's rows start alone and the others
    arrive while they decode."""
    opened = threading.Event()
    step = loop.session.step

    def gated():
        assert opened.wait(60)
        return step()

    monkeypatch.setattr(loop.session, "step", gated)
    return opened


def test_calls_in_flight_share_one_batch_and_match_batch_of_one(engine, monkeypatch):
    stats = SchedulerStats()
    loop = _loop(engine, stats)
    opened = _gate(loop, monkeypatch)
    blocks = [_requests(3, seed) for seed in (10, 20, 30)]  # every row makes >= 3 tokens
    results: dict = {}
    submitted = threading.Barrier(4)

    def call(k):  # what each concurrent call of the model stage does
        futures = loop.submit(blocks[k])
        submitted.wait(60)
        results[k] = [f.result(timeout=120) for f in futures]

    threads = [threading.Thread(target=call, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    submitted.wait(60)
    opened.set()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2]
    assert stats.peak_rows > 3  # rows of different calls decoded in one batch
    for k, block in enumerate(blocks):
        for req, res in zip(block, results[k]):
            alone = engine.generate([req], SAMPLING, return_masks=True)[0]
            assert res.token_ids == alone.token_ids
            assert torch.equal(res.keep_mask, alone.keep_mask)


def test_a_later_call_joins_rows_that_are_still_decoding(engine, monkeypatch):
    stats = SchedulerStats()
    loop = _loop(engine, stats)
    opened = _gate(loop, monkeypatch)
    first = [GenerationRequest(images=(patterned_image(84, 84, i),), prompt="Describe the image.", max_new_tokens=12)
             for i in range(2)]
    early = loop.submit(first)
    late = loop.submit(_requests(2, 40))  # submitted while the first call's rows are queued or running
    opened.set()
    got = [f.result(timeout=120) for f in early + late]
    assert stats.peak_rows >= 3 and stats.admissions >= 1
    assert [r.token_ids for r in got] == [engine.generate([q], SAMPLING)[0].token_ids for q in first + _requests(2, 40)]


def test_a_failing_row_fails_alone(engine):
    loop = _loop(engine)
    good = _requests(3, 50)
    bad = GenerationRequest(images=(patterned_image(84, 84, 9),), prompt="Describe the image.", visual_tokens=999)
    futures = loop.submit(good[:1] + [bad] + good[1:])
    with pytest.raises(Exception, match="999|visual"):
        futures[1].result(timeout=120)
    for req, f in zip(good, futures[:1] + futures[2:]):
        assert f.result(timeout=120).token_ids == engine.generate([req], SAMPLING)[0].token_ids
    # the loop goes on serving later calls
    assert loop.submit(good[:1])[0].result(timeout=120).token_ids == engine.generate(good[:1], SAMPLING)[0].token_ids


def test_a_broken_device_fails_every_pending_row_and_later_calls(engine, monkeypatch):
    loop = _loop(engine)

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(loop.session, "step", broken)
    futures = loop.submit(_requests(2, 60))
    for f in futures:
        with pytest.raises(RuntimeError, match="CUDA"):
            f.result(timeout=60)
    with pytest.raises(RuntimeError, match="CUDA"):
        loop.submit(_requests(1, 70))


def test_visual_features_of_concurrent_calls_stay_their_own(engine):
    """The ViT features come from forward hooks on shared blocks; a forward running in another thread at
    the same time (e.g. a direct engine call next to the actor's loop) must not land in this call's
    features."""
    core = engine.core
    levels = (0, 1)
    inputs = [engine.build_inputs([GenerationRequest(images=(patterned_image(w, h, w),), prompt="x")]) for w, h in ((56, 56), (112, 84))]
    want = [core.visual_features(i.pixel_values, i.image_grid_thw, levels) for i in inputs]
    errors = []

    def worker(k):
        try:
            for _ in range(25):
                _, feats = core.visual_features(inputs[k].pixel_values, inputs[k].image_grid_thw, levels)
                assert all(torch.equal(a, b) for a, b in zip(feats, want[k][1]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with torch.inference_mode():
        threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
