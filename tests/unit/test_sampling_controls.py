"""Per-row sampling controls (workers/modeling/sampling.py): top_k, repetition penalty, stop strings, and
a row's own SamplingParams. Rows with different settings share one batch (static and continuous) and
each equals its batch-of-1 result."""
from __future__ import annotations

import pytest
import torch

from workers.modeling.api import GenerationRequest, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.sampling import RowSampling, penalise, select_next, top_k_filter
from workers.modeling.scheduler import ContinuousScheduler, SchedulerConfig

from engine_helpers import patterned_image

pytestmark = pytest.mark.usefixtures("one_thread")


def test_penalty_and_top_k_rules():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    assert penalise(logits, [0, 1], 2.0).tolist() == [1.0, -2.0, 0.5, 3.0]
    assert top_k_filter(logits, 2).tolist() == [2.0, float("-inf"), float("-inf"), 3.0]
    greedy = RowSampling(SamplingParams(repetition_penalty=4.0))
    # Token 3 was generated before: 3.0 / 4 = 0.75 < 2.0, so token 0 wins.
    assert select_next(logits[None], [greedy], [[3]]).tolist() == [0]
    sampled = RowSampling(SamplingParams(temperature=5.0, top_k=1), torch.Generator().manual_seed(0))
    assert select_next(logits[None], [sampled], [[]]).tolist() == [3]  # top_k=1 is greedy at any temperature
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop="x")
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)


def _requests():
    own = [None, SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9),
           SamplingParams(max_new_tokens=8, repetition_penalty=1.8), SamplingParams(max_new_tokens=5)]
    return [GenerationRequest(images=(patterned_image(56 + 28 * (i % 2), 56, 70 + i),), prompt="Describe it.",
                              sampling=own[i], seed=100 + i) for i in range(4)]


def test_mixed_rows_equal_their_batch_of_one_static_and_continuous(tiny_model, tiny_processor, tiny_modules):
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules)
    call = SamplingParams(max_new_tokens=8, seed=3)
    reqs = _requests()
    batch = engine.generate(reqs, call)
    alone = [engine.generate([r], call)[0] for r in reqs]
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]
    assert len(batch[3].token_ids) <= 5  # its own max_new_tokens
    scheduler = ContinuousScheduler(engine, SchedulerConfig(kv_budget_tokens=10**9, max_rows=2, prefill_tokens=200))
    got = dict(scheduler.run(reqs, call))
    assert [got[i].token_ids for i in range(4)] == [b.token_ids for b in batch]
    plain = engine.generate([GenerationRequest(images=reqs[2].images, prompt=reqs[2].prompt, seed=102)], call)[0]
    assert plain.token_ids[0] == batch[2].token_ids[0]  # the penalty needs a history to act on


def test_stop_strings_cut_the_answer_and_end_the_row(tiny_model, tiny_processor, tiny_modules):
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules)
    req = _requests()[0]
    full = engine.generate([req], SamplingParams(max_new_tokens=12))[0]
    assert len(full.text) > 6, full.text
    stop = full.text[3:5]
    expected = full.text[:full.text.find(stop)]
    for run in ("static", "continuous"):
        params = SamplingParams(max_new_tokens=12, stop=(stop, "never-there"))
        if run == "static":
            res = engine.generate([req], params)[0]
        else:
            scheduler = ContinuousScheduler(engine, SchedulerConfig(kv_budget_tokens=10**9, max_rows=2, prefill_tokens=200))
            res = next(iter(scheduler.run([req], params)))[1]
        assert res.text == expected and res.finish_reason == "stop"
        assert len(res.token_ids) < len(full.token_ids) and full.token_ids[:len(res.token_ids)] == res.token_ids
