"""Pruning strategies (workers/modeling/strategies.py) on the tiny model: the budget is exact, batched
rows equal their batch-of-1 results, the kept sets equal slow obviously-correct references (FastV from
full eager attention, DivPrune from a brute-force greedy, DART from explicit loops, VisionZip's dominant
tokens from the ViT's own attention probabilities and its merge from explicit loops), keep-everything
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
                                         CDPrunerStrategy, RandomStrategy, Signals, UniformStrategy, VisionZipStrategy,
                                         cdpruner_select, divprune_select, keep_count, lattice, make_strategy, relevance,
                                         visionzip_select)

from engine_helpers import patterned_image

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = [RandomStrategy(seed=3), UniformStrategy(), FastVStrategy(layer=1), PDropStrategy(), DivPruneStrategy(),
       DartStrategy(layer=1, pivots=3), VisionZipStrategy(), CDPrunerStrategy()]
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


def _assert_keeps_top_k(engine, reqs, reference):
    """Each request's keep mask is exactly the top kept_tokens of reference(req)."""
    for req in reqs:
        res = engine.generate([req], SamplingParams(max_new_tokens=1), return_masks=True)[0]
        expected = torch.zeros_like(res.keep_mask)
        expected[torch.topk(reference(req), res.kept_tokens).indices] = True
        assert torch.equal(res.keep_mask, expected)


@pytest.mark.parametrize("layer", [0, 2])
def test_fastv_keeps_the_top_k_of_full_eager_attention(tiny_model, tiny_processor, layer):
    engine = engine_for(tiny_model, tiny_processor, FastVStrategy(layer=layer), ratio=0.25)
    _assert_keeps_top_k(engine, requests(3), lambda req: _eager_last_token_attention(tiny_model, tiny_processor, req, layer))


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


def _vit_received_reference(tiny_model, tiny_processor, req, block):
    """Slow reference for VisionZip's dominant score: the ViT's own attention probabilities of one
    block (captured from the model's forward through a registered eager attention function), column
    sums per image / queries, mean over heads, summed over each merged token's 4 patches; the
    window-order -> raster mapping is found by matching the merger's outputs to the tower's output."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    visual = tiny_model.model.visual
    target = visual.blocks[block].attn
    probs = []

    def capture(module, query, key, value, attention_mask=None, scaling=None, **kwargs):
        if module is target:
            p = (torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling).softmax(dim=-1)  # [1, h, n, n]
            probs.append(p[0].sum(dim=1).mean(dim=0) / p.shape[-1])  # [n]: received, mean over heads and queries
        return sdpa_attention_forward(module, query, key, value, attention_mask=attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register("vz_capture", capture)
    inputs = GlimpseEngine(tiny_model, tiny_processor).build_inputs([req])
    outs = {}
    hook = visual.blocks[-1].register_forward_hook(lambda _m, _a, out: outs.__setitem__("last", out))
    before = visual.config._attn_implementation
    visual.config._attn_implementation = "vz_capture"
    try:
        with torch.no_grad():
            pooled = visual(inputs.pixel_values, grid_thw=inputs.image_grid_thw).pooler_output
            window_merged = visual.merger(outs["last"])
    finally:
        visual.config._attn_implementation = before
        hook.remove()
    received = torch.cat(probs)  # window order, patches
    unit = visual.spatial_merge_size ** 2
    per_unit = received.view(-1, unit).sum(dim=1)
    order = [int(torch.cdist(pooled[r:r + 1], window_merged).argmin()) for r in range(pooled.shape[0])]
    assert sorted(order) == list(range(pooled.shape[0]))  # a true permutation
    return per_unit[order]


def test_visionzip_dominant_tokens_are_the_top_k_of_the_vits_own_attention(tiny_model, tiny_processor):
    layers = tiny_model.model.visual.config.fullatt_block_indexes
    for vit_layer, block in ((-1, max(layers)), (1, 1)):
        engine = engine_for(tiny_model, tiny_processor, VisionZipStrategy(contextual=0.0, vit_layer=vit_layer), ratio=0.3)
        _assert_keeps_top_k(engine, requests(4), lambda req, block=block: _vit_received_reference(tiny_model, tiny_processor, req, block))


def test_visionzip_merges_the_rest_into_their_most_similar_contextual_token():
    gen = torch.Generator().manual_seed(2)
    n, k_dom, k_ctx = 14, 3, 3
    scores, keys, embeds = torch.rand(n, generator=gen), torch.randn(n, 5, generator=gen), torch.randn(n, 4, generator=gen)
    mask, merged = visionzip_select(scores, keys, embeds, k_dom, k_ctx)
    dominant = sorted(range(n), key=lambda i: -float(scores[i]))[:k_dom]
    rest = [i for i in range(n) if i not in dominant]
    targets = [rest[int(j * len(rest) / k_ctx)] for j in range(k_ctx)]
    assert set(mask.nonzero().flatten().tolist()) == set(dominant) | set(targets)
    groups = {t: [t] for t in targets}
    cos = lambda i, j: float(torch.nn.functional.cosine_similarity(keys[i], keys[j], dim=0))  # noqa: E731
    for i in rest:
        if i not in targets:
            groups[max(targets, key=lambda t: cos(i, t))].append(i)
    expected = {i: embeds[i] for i in dominant}
    expected.update({t: torch.stack([embeds[i] for i in members]).mean(dim=0) for t, members in groups.items()})
    for row, i in enumerate(sorted(expected)):
        assert torch.allclose(merged[row], expected[i], atol=1e-6)
    assert VisionZipStrategy().split(64) == (54, 10) and VisionZipStrategy().split(1) == (1, 0)


@pytest.mark.parametrize("strategy", [FastVStrategy(layer=1, reindex=True), PDropStrategy(reindex=True),
                                      DivPruneStrategy(reindex=True)], ids=["fastv", "pdrop", "divprune"])
def test_contiguous_positions_keeping_everything_equal_the_plain_model(tiny_model, tiny_processor, strategy):
    reqs = requests(3)
    plain = GlimpseEngine(tiny_model, tiny_processor).generate(reqs, SamplingParams(max_new_tokens=6))
    full = engine_for(tiny_model, tiny_processor, strategy, ratio=1.0).generate(reqs, SamplingParams(max_new_tokens=6))
    assert [a.token_ids for a in plain] == [b.token_ids for b in full]


def test_contiguous_positions_before_the_llm_equal_the_stock_model_on_the_kept_tokens(tiny_model, tiny_processor):
    """Reference: the stock language model on exactly the kept embeddings with positions 0..n-1."""
    engine = engine_for(tiny_model, tiny_processor, DivPruneStrategy(reindex=True), ratio=0.3)
    original = engine_for(tiny_model, tiny_processor, DivPruneStrategy(), ratio=0.3)
    for req in requests(3):
        res = engine.generate([req], SamplingParams(max_new_tokens=1), return_masks=True)[0]
        inputs = engine.build_inputs([req])
        with torch.no_grad():
            state = engine.core.prefill(inputs, engine.rule)
            embeds, _ = engine.core.embed(inputs, ())
            keep = inputs.attention_mask[0].bool().clone()
            keep[inputs.input_ids[0] == tiny_model.config.image_token_id] = res.keep_mask
            x = embeds[0][keep][None]
            pos = torch.arange(x.shape[1])[None, None].expand(3, 1, -1)
            hidden = tiny_model.model.language_model(inputs_embeds=x, position_ids=pos).last_hidden_state
            ref = tiny_model.lm_head(hidden[:, -1])
            moved = original.core.prefill(inputs, original.rule).logits
        assert torch.allclose(state.logits, ref, atol=1e-5)
        assert not torch.allclose(moved, ref, atol=1e-3)  # the original positions give other logits


def test_contiguous_positions_after_layer_k_rotate_the_cached_keys_exactly(tiny_model, tiny_processor):
    """The keys left in layers 0..K must be those the new positions give: the layer's own k_proj on its
    input hidden states, rotated at 0..n-1 by the model's own rotary embedding."""
    k_layer = 2
    engine = engine_for(tiny_model, tiny_processor, FastVStrategy(layer=k_layer, reindex=True), ratio=0.3)
    lm = tiny_model.model.language_model
    req = requests(1)[0]
    inputs = engine.build_inputs([req])
    seen = {}
    hooks = [lm.layers[i].register_forward_pre_hook(lambda _m, args, i=i: seen.setdefault(i, args[0]))
             for i in range(k_layer + 1)]
    try:
        with torch.no_grad():
            row = engine.core.prune_stage(inputs, engine.rule)[0]
    finally:
        for h in hooks:
            h.remove()
    keep = inputs.attention_mask[0].bool().clone()
    keep[inputs.input_ids[0] == tiny_model.config.image_token_id] = row.keep_mask
    n = int(keep.sum())
    assert torch.equal(row.positions, torch.arange(n)[None].expand(3, -1))
    pos = torch.arange(n)[None, None].expand(3, 1, -1)
    with torch.no_grad():
        for i in range(k_layer + 1):
            layer = lm.layers[i]
            h = seen[i][0][keep][None]
            k = layer.self_attn.k_proj(layer.input_layernorm(h)).view(1, n, -1, layer.self_attn.head_dim).transpose(1, 2)
            cos, sin = lm.rotary_emb(h, pos)
            cos, sin = cos[:, None], sin[:, None]
            x1, x2 = k.chunk(2, dim=-1)
            expected = k * cos + torch.cat((-x2, x1), dim=-1) * sin
            assert torch.allclose(row.keys[i], expected[0], atol=1e-5)


def test_cdpruner_equals_the_brute_force_greedy_log_det():
    """Reference: at every step the token that maximises log det of the conditional kernel on the chosen
    set, computed from scratch with torch.logdet (no Cholesky updates)."""
    gen = torch.Generator().manual_seed(3)
    for trial in range(5):
        x, text = torch.randn(10, 12, generator=gen, dtype=torch.float64), torch.randn(4, 12, generator=gen, dtype=torch.float64)
        r = relevance(x, text, 0.1).double()
        xn = torch.nn.functional.normalize(x, dim=-1)
        kernel = r[:, None] * (xn @ xn.T) * r[None, :]
        for k in (1, 3, 6):
            chosen: list = []
            while len(chosen) < k:
                best = max((i for i in range(10) if i not in chosen),
                           key=lambda i: float(torch.logdet(kernel[chosen + [i]][:, chosen + [i]])))
                chosen.append(best)
            got = cdpruner_select(x.float(), text.float(), k, 0.1)
            assert set(got.nonzero().flatten().tolist()) == set(chosen)
    # a rank-1 kernel: one pick exhausts it, the rest go by relevance
    same = torch.ones(6, 4)
    assert int(cdpruner_select(same, torch.randn(2, 4, generator=gen), 3).sum()) == 3
