"""Explicit per-row keep masks in the engine's public API, against the plain model, against GlimpsePrune
and against a slow, obviously-correct reference.

Reference (`reference_masked_generate`): one sample, no KV cache, the whole sequence [prompt, generated...]
re-run through the stock decoder layers at every step, with explicit visibility masks:
  * layers 0..keep_layer: prompt tokens see all earlier prompt tokens; generated tokens see only the
    kept prompt tokens (the pruned ones are not in the cache) and earlier generated tokens;
  * layers > keep_layer: the same, except prompt tokens also see only kept prompt tokens;
  * positions: prompt tokens keep their M-RoPE positions, the t-th generated token is last + 1 + t.
keep_layer = -1 makes every layer a "late" one (pruned from the LLM's input).
"""
from __future__ import annotations

import pytest
import torch

from workers.modeling.api import GenerationRequest, KeepMasks, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.keep_rule import KeepRule

from test_engine_equivalence import MAX_NEW, make_requests, processor_batch, stock_new_tokens

pytestmark = pytest.mark.usefixtures("one_thread")
N_LAYERS = 4  # the tiny model's text layers; the tiny glimpse modules prune after layer 2


@torch.inference_mode()
def reference_masked_generate(model, batch, keep, keep_layer, max_new, eos_ids):
    """Slow single-sample pruning with an explicit keep mask (see module docstring): (step logits, tokens)."""
    lm = model.model.language_model
    ids, grid = batch["input_ids"], batch["image_grid_thw"]
    assert ids.shape[0] == 1 and int(batch["attention_mask"].min()) == 1
    n_prompt = ids.shape[1]
    is_image = ids[0] == model.config.image_token_id
    embeds = lm.embed_tokens(ids).clone()
    embeds[0, is_image] = model.model.visual(batch["pixel_values"], grid_thw=grid).pooler_output
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=grid)
    last = int(pos[:, 0, -1].max())
    keep_tok = torch.ones(n_prompt, dtype=torch.bool)
    keep_tok[is_image] = torch.as_tensor(keep, dtype=torch.bool)
    tokens, step_logits = [], []
    for _ in range(max_new):
        n = n_prompt + len(tokens)
        h = torch.cat([embeds, lm.embed_tokens(torch.tensor([tokens], dtype=torch.long).view(1, -1))], dim=1)
        gen_pos = (last + 1 + torch.arange(len(tokens))).view(1, 1, -1).expand(3, 1, -1)
        rope = lm.rotary_emb(h, torch.cat([pos, gen_pos], dim=2))
        early = torch.ones(n, n, dtype=torch.bool).tril()
        early[n_prompt:, :n_prompt] &= keep_tok  # generated tokens never see pruned tokens
        late = early.clone()
        late[:n_prompt, :n_prompt] &= keep_tok  # after keep_layer, prompt tokens see only kept tokens
        for m in (early, late):
            m.fill_diagonal_(True)
        for i, layer in enumerate(lm.layers):
            h = layer(h, attention_mask=(early if i <= keep_layer else late)[None, None], position_embeddings=rope)
        logits = model.lm_head(lm.norm(h[:, n - 1]))[0].float()
        step_logits.append(logits)
        tokens.append(int(logits.argmax()))
        if tokens[-1] in eos_ids:
            break
    return step_logits, tokens


@torch.inference_mode()
def teacher_forced_logits(engine, inputs, forced, **prefill_kwargs) -> list:
    """Per step [B, V] logits of the engine's prefill + cached decode, fed the given tokens [B, T]."""
    state = engine.core.prefill(engine._to_device(inputs), **prefill_kwargs)
    logits, pad, out = state.logits, state.pad_mask, [state.logits]
    for step in range(forced.shape[1] - 1):
        pad = torch.cat([pad, pad.new_ones(pad.shape[0], 1)], dim=1)
        logits = engine.core.decode_step(forced[:, step], state.next_positions + step, pad, state.cache)
        out.append(logits)
    return out


def visual_counts(engine, requests) -> list:
    inputs = engine.build_inputs(requests)
    per_image = (inputs.image_grid_thw.prod(-1) // 4).tolist()
    counts, k = [], 0
    for req in requests:
        counts.append(int(sum(per_image[k:k + len(req.images)])))
        k += len(req.images)
    return counts


def random_masks(counts, share, seed) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=gen) < share for n in counts]


@pytest.mark.parametrize("keep_layer, with_modules", [(None, True), (-1, False), (0, False), (2, True), (3, False)])
def test_all_true_mask_equals_unpruned(tiny_model, tiny_processor, tiny_modules, keep_layer, with_modules):
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules if with_modules else None)
    requests = make_requests()
    batch = processor_batch(engine, requests)
    masks = [torch.ones(n, dtype=torch.bool) for n in visual_counts(engine, requests)]
    sampling = SamplingParams(max_new_tokens=MAX_NEW)
    unpruned = engine.generate_from_inputs(dict(batch), sampling, prune=False)
    kept_all = engine.generate_from_inputs(dict(batch), sampling, keep=KeepMasks(tuple(masks), keep_layer))
    assert [r.token_ids for r in kept_all] == [r.token_ids for r in unpruned] == stock_new_tokens(tiny_model, batch, engine, MAX_NEW)
    assert all(r.keep_ratio == 1.0 and r.kept_tokens == r.visual_tokens > 0 for r in kept_all)
    plain = engine.core.prefill(engine._to_device(dict(batch)))
    masked = engine.core.prefill(engine._to_device(dict(batch)), keep_masks=masks, keep_layer=keep_layer)
    torch.testing.assert_close(masked.logits, plain.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", [KeepRule(), KeepRule(fixed_remain_ratio=0.25), KeepRule(threshold=0.6, max_remain_ratio=0.3)])
def test_glimpse_masks_equal_glimpse_pruning(tiny_model, tiny_processor, tiny_modules, rule):
    """The glimpse's own keep masks fed back explicitly (with the modules loaded, and with none loaded
    and the layer named) give GlimpsePrune's logits at every step (1e-5) and its tokens."""
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules, rule)
    external = GlimpseEngine(tiny_model, tiny_processor)
    requests = make_requests()
    inputs = engine.build_inputs(requests)
    sampling = SamplingParams(max_new_tokens=MAX_NEW)
    glimpsed = engine.generate_from_inputs(inputs, sampling, return_masks=True)
    masks = tuple(r.keep_mask for r in glimpsed)
    assert any(0 < r.keep_ratio < 1 for r in glimpsed)
    for eng, layer in ((engine, None), (external, 2)):
        got = eng.generate_from_inputs(inputs, sampling, return_masks=True, keep=KeepMasks(masks, layer))
        assert [r.token_ids for r in got] == [r.token_ids for r in glimpsed]
        assert all(torch.equal(a.keep_mask, b.keep_mask) and a.kept_per_image == b.kept_per_image for a, b in zip(got, glimpsed))
        assert all(r.importance_logits is None for r in got)
    width = min(len(r.token_ids) for r in glimpsed)
    forced = torch.tensor([r.token_ids[:width] for r in glimpsed])
    ref_steps = teacher_forced_logits(engine, inputs, forced, rule=rule)
    for eng, layer in ((engine, None), (external, 2)):
        steps = teacher_forced_logits(eng, inputs, forced, keep_masks=list(masks), keep_layer=layer)
        for got, ref in zip(steps, ref_steps):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep_layer", [-1, 0, 1, 2, 3])
def test_masks_match_reference_at_any_layer(tiny_model, tiny_processor, keep_layer):
    """Random masks (one of them empty) pruned after any layer, batched, equal the slow reference per row."""
    engine = GlimpseEngine(tiny_model, tiny_processor)
    requests = make_requests()
    masks = random_masks(visual_counts(engine, requests), 0.3, seed=keep_layer + 10)
    masks[2] = torch.zeros_like(masks[2])  # no visual tokens at all for the third row
    batched = engine.generate([GenerationRequest(r.images, r.prompt, keep_mask=m) for r, m in zip(requests, masks)],
                              SamplingParams(max_new_tokens=MAX_NEW), keep_layer=keep_layer)
    assert batched[2].kept_tokens == 0 and batched[2].keep_ratio == 0.0
    assert all(r.kept_tokens == int(m.sum()) for r, m in zip(batched, masks))
    for row, (req, mask) in enumerate(zip(requests, masks)):
        batch1 = processor_batch(engine, [req])
        ref_logits, ref_tokens = reference_masked_generate(tiny_model, batch1, mask, keep_layer, MAX_NEW, engine.eos_ids)
        assert batched[row].token_ids == ref_tokens, f"row {row}"
        steps = teacher_forced_logits(engine, dict(batch1), torch.tensor([ref_tokens]), keep_masks=[mask], keep_layer=keep_layer)
        for got, ref in zip(steps, ref_logits):
            torch.testing.assert_close(got[0], ref, atol=1e-4, rtol=1e-4)


def test_batched_equals_per_row_with_modules_and_text_only_rows(tiny_model, tiny_processor, tiny_modules):
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules)
    requests = make_requests()
    masks = random_masks(visual_counts(engine, requests), 0.2, seed=3)
    masks[0] = torch.zeros_like(masks[0])
    rows = [GenerationRequest(prompt="Describe the image.")] + [
        GenerationRequest(r.images, r.prompt, keep_mask=m) for r, m in zip(requests, masks)]
    sampling = SamplingParams(max_new_tokens=MAX_NEW)
    batched = engine.generate(rows, sampling, return_masks=True)
    assert batched[0].visual_tokens == 0 and batched[0].keep_ratio == 1.0
    for req, got in zip(rows, batched):
        alone = engine.generate([req], sampling, return_masks=True)[0]
        assert got.token_ids == alone.token_ids
        assert got.kept_tokens == alone.kept_tokens and got.kept_per_image == alone.kept_per_image
        if req.keep_mask is not None:
            assert torch.equal(got.keep_mask, torch.as_tensor(req.keep_mask))


def test_regrouped_masked_rows_match_one_batch(tiny_model, tiny_processor):
    """The pipeline's split path (`glimpse(inputs, keep)` + `generate_from_rows`) with explicit masks."""
    engine = GlimpseEngine(tiny_model, tiny_processor)
    requests = make_requests()
    masks = random_masks(visual_counts(engine, requests), 0.4, seed=5)
    sampling = SamplingParams(max_new_tokens=MAX_NEW)
    whole = engine.generate_from_inputs(engine.build_inputs(requests), sampling, keep=KeepMasks(tuple(masks), 1))
    rows_a, _ = engine.glimpse(engine.build_inputs(requests[:2]), KeepMasks(tuple(masks[:2]), 1))
    rows_b, _ = engine.glimpse(engine.build_inputs(requests[2:]), KeepMasks(tuple(masks[2:]), 1))
    regrouped = engine.generate_from_rows([rows_b[0], rows_a[1], rows_a[0]], sampling)
    assert [r.token_ids for r in regrouped] == [whole[2].token_ids, whole[1].token_ids, whole[0].token_ids]
    rows_c, _ = engine.glimpse(engine.build_inputs(requests[2:]), KeepMasks(tuple(masks[2:]), 0))
    with pytest.raises(ValueError, match="different layers"):
        engine.generate_from_rows([rows_a[0], rows_c[0]], sampling)


def test_bad_keep_masks_are_refused(tiny_model, tiny_processor, tiny_modules):
    engine = GlimpseEngine(tiny_model, tiny_processor)
    requests = make_requests()
    counts = visual_counts(engine, requests)
    inputs = engine.build_inputs(requests)
    good = tuple(torch.ones(n, dtype=torch.bool) for n in counts)
    with pytest.raises(ValueError, match="need a keep_layer"):
        engine.generate_from_inputs(inputs, keep=KeepMasks(good))
    with pytest.raises(ValueError, match="keep_layer must be in -1..3"):
        engine.generate_from_inputs(inputs, keep=KeepMasks(good, N_LAYERS))
    with pytest.raises(ValueError, match="row 1: keep mask has"):
        engine.generate_from_inputs(inputs, keep=KeepMasks((good[0], good[1][:-1], good[2]), 0))
    with pytest.raises(ValueError, match="2 keep masks for 3 rows"):
        engine.generate_from_inputs(inputs, keep=KeepMasks(good[:2], 0))
    with pytest.raises(ValueError, match="prune=True"):
        engine.generate_from_inputs(inputs, prune=False, keep=KeepMasks(good, 0))
    with pytest.raises(ValueError, match="no keep_mask while others"):
        engine.generate([GenerationRequest(requests[0].images, requests[0].prompt, keep_mask=good[0]), requests[1]])
    with pytest.raises(ValueError, match="keep_layer must be >= -1"):
        KeepMasks(good, -2)
