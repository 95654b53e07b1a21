"""Pruning strategies (workers/modeling/strategies.py) on the tiny model: the budget is exact, batched
rows equal their batch-of-1 results, the kept sets equal slow obviously-correct references (FastV from
full eager attention, DivPrune from a brute-force greedy, DART from explicit loops), keep-everything
equals the plain model, and every strategy runs through the continuous scheduler."""
from __future__ import annotations

import itertools

import pytest
import torch

from workers.modeling.api import GenerationRequest, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.keep_rule import KeepRule
from workers.modeling.scheduler import ContinuousScheduler, SchedulerConfig
from workers.modeling.strategies import (STRATEGIES, DartStrategy, DivPruneStrategy, FastVStrategy, PDropStrategy,
                                         RandomStrategy, Signals, UniformStrategy, divprune_select, keep_count, lattice,
                                         make_strategy)

from engine_helpers import patterned_image

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = [RandomStrategy(seed=3), UniformStrategy(), FastVStrategy(layer=1), PDropStrategy(), DivPruneStrategy(),
       DartStrategy(layer=1, pivots=3)]
IDS = [s.name for s in ALL]


def requests(count=5):
    sizes = [(112, 84), (56, 56), (140, 112), (84, 140), (112, 112), (56, 84)]
    prompts = ("What color is the circle?", "How many squares?", "Describe the image.")
    out = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        images = (patterned_image(w, h, 40 + i),) if i != 3 else (patterned_image(56, 56, 9), patterned_image(84, 56, 10))
        out.append(GenerationRequest(images=images, prompt=prompts[i % 3], prune_seed=1000 + i))
    return out


def engine_for(model, processor, strategy, ratio=0.3):
    return GlimpseEngine(model, processor, rule=KeepRule(fixed_remain_ratio=ratio), strategy=strategy)


@pytest.mark.parametrize("strategy", ALL, ids=IDS)
def test_budget_exact_and_batch_equals_batch_of_one(tiny_model, tiny_processor, strategy):
    engine = engine_for(tiny_model, tiny_processor, strategy)
    reqs = requests()
    batch = engine.generate(reqs, SamplingParams(max_new_tokens=6), return_masks=True)
    for req, res in zip(reqs, batch):
        assert res.kept_tokens == keep_count(res.visual_tokens, 0.3)  # exact budget, jointly over the row's images
        assert int(res.keep_mask.sum()) == res.kept_tokens
        alone = engine.generate([req], SamplingParams(max_new_tokens=6), return_masks=True)[0]
        assert torch.equal(res.keep_mask, alone.keep_mask)
        assert res.token_ids == alone.token_ids


@pytest.mark.parametrize("strategy", ALL, ids=IDS)
def test_keeping_everything_equals_the_plain_model(tiny_model, tiny_processor, strategy):
    reqs = requests(3)
    plain = GlimpseEngine(tiny_model, tiny_processor).generate(reqs, SamplingParams(max_new_tokens=6))
    full = engine_for(tiny_model, tiny_processor, strategy, ratio=1.0).generate(reqs, SamplingParams(max_new_tokens=6))
    for a, b in zip(plain, full):
        assert b.kept_tokens == b.visual_tokens
        assert a.token_ids == b.token_ids


@pytest.mark.parametrize("strategy", ALL, ids=IDS)
def test_the_continuous_scheduler_gives_the_same_rows(tiny_model, tiny_processor, strategy):
    engine = engine_for(tiny_model, tiny_processor, strategy)
    reqs = requests()
    scheduler = ContinuousScheduler(engine, SchedulerConfig(kv_budget_tokens=10**9, max_rows=2, prefill_tokens=300))
    got = dict(scheduler.run(reqs, SamplingParams(max_new_tokens=6), return_masks=True))
    static = engine.generate(reqs, SamplingParams(max_new_tokens=6), return_masks=True)
    for i, res in enumerate(static):
        assert torch.equal(got[i].keep_mask, res.keep_mask)
        assert got[i].token_ids == res.token_ids


def test_a_rows_own_keep_ratio(tiny_model, tiny_processor):
    engine = engine_for(tiny_model, tiny_processor, DivPruneStrategy())
    req = requests(1)[0]
    own = GenerationRequest(images=req.images, prompt=req.prompt, keep_rule=KeepRule(fixed_remain_ratio=0.5))
    a, b = engine.generate([req, own], SamplingParams(max_new_tokens=2))
    assert (a.kept_tokens, b.kept_tokens) == (keep_count(a.visual_tokens, 0.3), keep_count(b.visual_tokens, 0.5))


def _eager_last_token_attention(tiny_model, tiny_processor, req, layer):
    """Slow reference: the stock model with eager attention, attention weights of `layer`, last row."""
    engine = GlimpseEngine(tiny_model, tiny_processor)
    inputs = engine.build_inputs([req])
    before = tiny_model.config._attn_implementation
    tiny_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tiny_model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                             image_grid_thw=inputs.image_grid_thw, output_attentions=True,
                             mm_token_type_ids=(inputs.input_ids == tiny_model.config.image_token_id).int())
    finally:
        tiny_model.set_attn_implementation(before)
    att = out.attentions[layer][0, :, -1].mean(dim=0)  # [L]
    return att[inputs.input_ids[0] == tiny_model.config.image_token_id]


@pytest.mark.parametrize("layer", [0, 2])
def test_fastv_keeps_the_top_k_of_full_eager_attention(tiny_model, tiny_processor, layer):
    engine = engine_for(tiny_model, tiny_processor, FastVStrategy(layer=layer), ratio=0.25)
    for req in requests(3):
        res = engine.generate([req], SamplingParams(max_new_tokens=1), return_masks=True)[0]
        ref = _eager_last_token_attention(tiny_model, tiny_processor, req, layer)
        expected = torch.zeros_like(res.keep_mask)
        expected[torch.topk(ref, res.kept_tokens).indices] = True
        assert torch.equal(res.keep_mask, expected)


def test_pdrop_stages_shrink_geometrically_and_follow_attention(tiny_model, tiny_processor):
    layers = tiny_model.config.text_config.num_hidden_layers
    pdrop = PDropStrategy(fractions=(0.25, 0.5, 0.75))
    assert pdrop.stages(layers) == [round(f * layers) - 1 for f in (0.25, 0.5, 0.75)]
    assert pdrop.stage_budgets(576, 72, 32) == [288, 144, 72]  # the paper's 50/25/12.5% at lambda 0.5
    # One stage at layer K is FastV at K.
    one = engine_for(tiny_model, tiny_processor, PDropStrategy(fractions=(3 / layers,)), ratio=0.25)
    fast = engine_for(tiny_model, tiny_processor, FastVStrategy(layer=2), ratio=0.25)
    for req in requests(2):
        a = one.generate([req], SamplingParams(max_new_tokens=3), return_masks=True)[0]
        b = fast.generate([req], SamplingParams(max_new_tokens=3), return_masks=True)[0]
        assert torch.equal(a.keep_mask, b.keep_mask) and a.token_ids == b.token_ids


def _greedy_reference(x: torch.Tensor, k: int) -> set:
    """DivPrune's greedy from the full distance matrix, recomputed from scratch at every step."""
    n = x.shape[0]
    d = [[1.0 - float(torch.nn.functional.cosine_similarity(x[i], x[j], dim=0)) for j in range(n)] for i in range(n)]
    first = max(range(n), key=lambda i: min(d[i][j] for j in range(n) if j != i))
    chosen = [first]
    while len(chosen) < k:
        chosen.append(max((i for i in range(n) if i not in chosen), key=lambda i: min(d[i][j] for j in chosen)))
    return set(chosen)


def test_divprune_equals_the_brute_force_greedy_and_is_a_half_approximation():
    gen = torch.Generator().manual_seed(0)
    for trial in range(6):
        x = torch.randn(9, 5, generator=gen)
        for k in (1, 3, 5):
            got = set(divprune_select(x, k, block=4).nonzero().flatten().tolist())
            assert got == _greedy_reference(x, k)
            if k > 1:  # greedy max-min dispersion is a 2-approximation of the best subset (brute force)
                xn = torch.nn.functional.normalize(x, dim=-1)
                dist = 1.0 - xn @ xn.T
                spread = lambda s: min(float(dist[i, j]) for i, j in itertools.combinations(s, 2))  # noqa: E731
                best = max(spread(s) for s in itertools.combinations(range(9), k))
                assert spread(sorted(got)) >= best / 2 - 1e-6


def test_dart_keeps_pivots_and_the_least_similar_tokens():
    gen = torch.Generator().manual_seed(1)
    hidden, keys = torch.randn(12, 6, generator=gen), torch.randn(12, 8, generator=gen)
    sig = Signals(n=12, original=torch.arange(12), grids=[(3, 4, 0)], hidden=hidden, keys=keys)
    got = DartStrategy(pivots=2).select(sig, 5)
    norms = keys.norm(dim=-1).tolist()
    pivots = sorted(range(12), key=lambda i: -norms[i])[:2]
    cos = lambda i, j: float(torch.nn.functional.cosine_similarity(hidden[i], hidden[j], dim=0))  # noqa: E731
    rest = sorted((i for i in range(12) if i not in pivots), key=lambda i: max(cos(i, p) for p in pivots))[:3]
    assert set(got.nonzero().flatten().tolist()) == set(pivots) | set(rest)


def test_uniform_lattice_is_exact_and_spread():
    for h, w, k in [(8, 8, 16), (8, 8, 5), (3, 7, 7), (10, 4, 39), (1, 9, 3), (6, 6, 36)]:
        cells = lattice(h, w, k)
        assert len(cells) == k == len(set(cells)) and all(0 <= c < h * w for c in cells)
    assert sorted(lattice(8, 8, 16)) == [y * 8 + x for y in (1, 3, 5, 7) for x in (1, 3, 5, 7)]


def test_random_depends_on_the_row_seed_only(tiny_model, tiny_processor):
    engine = engine_for(tiny_model, tiny_processor, RandomStrategy(seed=0))
    req = requests(1)[0]
    other = GenerationRequest(images=req.images, prompt=req.prompt, prune_seed=7)
    a1, b = engine.generate([req, other], SamplingParams(max_new_tokens=1), return_masks=True)
    a2 = engine.generate([req], SamplingParams(max_new_tokens=1), return_masks=True)[0]
    assert torch.equal(a1.keep_mask, a2.keep_mask) and not torch.equal(a1.keep_mask, b.keep_mask)


def test_a_strategy_that_breaks_its_budget_is_caught(tiny_model, tiny_processor):
    class Greedy(UniformStrategy):
        def select(self, sig, k):
            return torch.ones(sig.n, dtype=torch.bool)

    engine = engine_for(tiny_model, tiny_processor, Greedy(), ratio=0.2)
    with pytest.raises(RuntimeError, match="not its budget"):
        engine.generate(requests(1), SamplingParams(max_new_tokens=1))


def test_make_strategy_validates():
    assert set(STRATEGIES) >= {"random", "uniform", "fastv", "pdrop", "divprune", "dart"}
    assert make_strategy("fastv", layer=3) == FastVStrategy(layer=3)
    with pytest.raises(ValueError, match="unknown pruning strategy"):
        make_strategy("fastvv")
    with pytest.raises(ValueError, match="no parameter"):
        make_strategy("divprune", layer=2)
    with pytest.raises(ValueError, match="outside"):
        FastVStrategy(layer=99).stages(4)
