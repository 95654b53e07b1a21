"""The continuous scheduler: rows joining and leaving the decode batch at different steps give exactly
their batch-of-1 output; the KV budget bounds the running batch; sampling is reproducible per row."""
from __future__ import annotations

import pytest
import torch

from workers.modeling.api import GenerationRequest, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.keep_rule import KeepRule
from workers.modeling.scheduler import ContinuousScheduler, SchedulerConfig, SchedulerStats

from engine_helpers import patterned_image

PROMPTS = ("What color is the circle?", "How many squares are there?", "Describe the image.", "Is there a red shape?")


def mixed_requests(count: int = 10, seed: int = 0) -> list[GenerationRequest]:
    """Rows of different image sizes, prompts and per-row token limits (so they leave at different steps)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        w, h = [28 * int(v) for v in torch.randint(2, 6, (2,), generator=gen)]
        images = (patterned_image(w, h, 100 + i),) if i % 5 != 4 else ()  # some text-only rows
        out.append(GenerationRequest(images=images, prompt=PROMPTS[i % len(PROMPTS)],
                                     max_new_tokens=int(torch.randint(2, 12, (), generator=gen))))
    return out


def run_all(scheduler, requests, sampling=SamplingParams(max_new_tokens=12), **kw):
    results = dict(scheduler.run(requests, sampling, **kw))
    assert sorted(results) == list(range(len(requests)))
    return [results[i] for i in range(len(requests))]


@pytest.fixture(params=["glimpse", "plain"])
def engine(request, tiny_model, tiny_processor, tiny_modules):
    if request.param == "plain":
        return GlimpseEngine(tiny_model, tiny_processor)
    return GlimpseEngine(tiny_model, tiny_processor, tiny_modules, KeepRule(threshold=0.5, min_remain_num=2))


def test_greedy_rows_equal_their_batch_of_one(engine):
    requests = mixed_requests()
    stats = SchedulerStats()
    # Small chunks and at most 4 rows decoding: rows join as others leave.
    scheduler = ContinuousScheduler(engine, SchedulerConfig(kv_budget_tokens=10**9, max_rows=4, prefill_tokens=400), stats)
    got = run_all(scheduler, requests, return_masks=True)
    assert stats.admissions >= 3 and stats.peak_rows == 4
    for req, res in zip(requests, got):
        alone = engine.generate([req], SamplingParams(max_new_tokens=12), return_masks=True)[0]
        assert res.token_ids == alone.token_ids
        assert len(res.token_ids) <= req.max_new_tokens
        assert res.finish_reason == alone.finish_reason
        assert (res.kept_tokens, res.visual_tokens, res.prompt_tokens) == (alone.kept_tokens, alone.visual_tokens, alone.prompt_tokens)
        if engine.prunes and req.images:
            assert torch.equal(res.keep_mask, alone.keep_mask)
        assert res.prefill_s > 0 and res.decode_s >= 0
    # Per-row shares add up to the batch totals.
    assert sum(r.decode_s for r in got) == pytest.approx(stats.decode_s, rel=0.05)
    assert sum(r.extra["decode_share"] for r in got) == pytest.approx(stats.decode_steps)
    assert stats.output_tokens == sum(r.output_tokens for r in got)
    # While rows wait to join, the batch stays fuller than over the whole run (which ends in a drain).
    assert 0 < stats.queued_steps < stats.decode_steps
    assert stats.achieved_concurrency < stats.steady_concurrency == 4  # a freed slot is refilled in the same step
    assert stats.surgery_s > 0  # rows joined and left: the cache was copied, and timed
    everyone = SchedulerStats()  # room for every row at once: nothing ever waits
    run_all(ContinuousScheduler(engine, SchedulerConfig(kv_budget_tokens=10**9, max_rows=64), everyone), requests)
    assert everyone.queued_steps == 0 and everyone.steady_concurrency == 0.0


def test_primed_rows_wait_finished_and_join_one_by_one(engine):
    """prime_rows: a slot freed alone does not cost a one-row forward through the top layers; the rows
    finished ahead join later and still give their batch-of-one output."""
    requests = mixed_requests(12, seed=3)
    got, calls = {}, {}
    for prime in (1, 4):
        stats = SchedulerStats()
        config = SchedulerConfig(kv_budget_tokens=10**9, max_rows=3, prefill_tokens=400, prime_rows=prime)
        got[prime] = [r.token_ids for r in run_all(ContinuousScheduler(engine, config, stats), requests)]
        calls[prime] = stats.finish_calls
        assert stats.steady_concurrency == 3
    assert got[1] == got[4] == [r.token_ids for r in engine.generate(requests, SamplingParams(max_new_tokens=12))]
    assert calls[4] < calls[1]
    with pytest.raises(ValueError, match="prime_rows"):
        SchedulerConfig(kv_budget_tokens=10, prime_rows=0)


def test_rows_submitted_while_others_run_equal_their_batch_of_one(engine):
    """A session takes new rows between steps (the model stage feeds it block after block): rows that
    arrive while earlier ones decode join the same batch and still give their batch-of-1 output."""
    requests = mixed_requests(9, seed=5)
    stats = SchedulerStats()
    session = ContinuousScheduler(engine, SchedulerConfig(kv_budget_tokens=10**9, max_rows=4, prefill_tokens=400), stats).session(
        SamplingParams(max_new_tokens=12), return_masks=True)
    got, joined_running = {}, 0
    for wave in (requests[:3], requests[3:5], requests[5:]):
        if session.running:
            joined_running += 1
        for index, req in zip(session.submit(wave), wave):
            assert index == requests.index(req)
        for _ in range(2):  # two steps, then the next wave arrives
            got.update(session.step())
    while session.busy:
        got.update(session.step())
    assert joined_running >= 2  # the later waves really met running rows
    assert sorted(got) == list(range(len(requests)))
    for i, req in enumerate(requests):
        alone = engine.generate([req], SamplingParams(max_new_tokens=12), return_masks=True)[0]
        assert got[i].token_ids == alone.token_ids
        if engine.prunes and req.images:
            assert torch.equal(got[i].keep_mask, alone.keep_mask)
    assert not session.busy and session.abort() == {}


def test_abort_drops_the_started_rows_and_keeps_the_queue(engine):
    session = ContinuousScheduler(engine, SchedulerConfig(kv_budget_tokens=10**9, max_rows=2, prefill_tokens=200)).session(
        SamplingParams(max_new_tokens=12))
    requests = mixed_requests(6)
    ids = session.submit(requests)
    done = [i for i, _ in session.step()]
    dropped = session.abort()
    assert dropped and all(dropped[i] is requests[i] for i in dropped)
    rest = {}
    while session.busy:  # the queued rows still run
        rest.update(session.step())
    assert sorted(done + list(dropped) + list(rest)) == ids


def test_static_engine_honours_per_row_limits(engine):
    requests = mixed_requests(4)
    batch = engine.generate(requests, SamplingParams(max_new_tokens=12))
    for req, res in zip(requests, batch):
        assert res.output_tokens <= req.max_new_tokens
        alone = engine.generate([req], SamplingParams(max_new_tokens=12))[0]
        assert res.token_ids == alone.token_ids


def test_kv_budget_bounds_the_batch(tiny_model, tiny_processor, tiny_modules):
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules, KeepRule(threshold=0.5))
    requests = [GenerationRequest(images=(patterned_image(112, 112, i),), prompt="Describe the image.", max_new_tokens=6)
                for i in range(6)]
    layers = tiny_model.config.text_config.num_hidden_layers
    glimpsed, _ = engine.glimpse(engine.build_inputs(requests))
    longest = max(r.length for r in glimpsed) + 6
    budget = 2 * longest * layers  # room for two rows at a time
    stats = SchedulerStats()
    got = run_all(ContinuousScheduler(engine, SchedulerConfig(kv_budget_tokens=budget, max_rows=64), stats), requests,
                  SamplingParams(max_new_tokens=6))
    assert stats.peak_rows == 2
    assert stats.cache_slots <= stats.decode_steps * budget  # the rectangle never outgrew the budget
    assert 0 < stats.kv_budget_use <= 1.0
    assert [r.token_ids for r in got] == [r.token_ids for r in engine.generate(requests, SamplingParams(max_new_tokens=6))]


def test_row_over_budget_runs_alone(tiny_model, tiny_processor, tiny_modules):
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules, KeepRule(threshold=0.5))
    requests = mixed_requests(3)
    stats = SchedulerStats()
    got = run_all(ContinuousScheduler(engine, SchedulerConfig(kv_budget_tokens=1, max_rows=8), stats), requests)
    assert stats.peak_rows == 1 and stats.rows_over_budget == 3
    assert all(r.output_tokens >= 1 for r in got)


def test_sampling_is_reproducible_per_row(tiny_model, tiny_processor, tiny_modules):
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules, KeepRule(threshold=0.5))
    base = mixed_requests(6, seed=3)
    requests = [GenerationRequest(images=r.images, prompt=r.prompt, max_new_tokens=r.max_new_tokens, seed=1000 + i)
                for i, r in enumerate(base)]
    sampling = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    wide = run_all(ContinuousScheduler(engine, SchedulerConfig(kv_budget_tokens=10**9, max_rows=6)), requests, sampling)
    narrow = run_all(ContinuousScheduler(engine, SchedulerConfig(kv_budget_tokens=10**9, max_rows=2, prefill_tokens=200)),
                     requests[::-1], sampling)[::-1]
    assert [r.token_ids for r in wide] == [r.token_ids for r in narrow]  # a row's draws ignore its neighbours
    alone = [engine.generate([r], sampling)[0].token_ids for r in requests]
    assert [r.token_ids for r in wide] == alone
    greedy = run_all(ContinuousScheduler(engine, SchedulerConfig(kv_budget_tokens=10**9)), requests, SamplingParams(max_new_tokens=12))
    assert [r.token_ids for r in wide] != [r.token_ids for r in greedy]


def test_config_is_checked():
    with pytest.raises(ValueError, match="kv_budget_tokens"):
        SchedulerConfig(kv_budget_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationRequest(prompt="x", max_new_tokens=0)
