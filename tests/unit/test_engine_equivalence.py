"""The engine against stock transformers and against a slow, obviously-correct reference.

Reference (`reference_generate`): one sample, no KV cache, the whole sequence
[prompt, glimpse, generated...] re-run through the stock decoder layers at every step, with explicit
masks saying which tokens each layer may see:
  * layers 0..K: prompt tokens see all earlier prompt tokens; the glimpse sees the prompt and itself;
    generated tokens see the kept prompt tokens and earlier generated tokens, never the glimpse;
  * layers > K: the same, except prompt tokens also see only kept prompt tokens;
  * positions: prompt tokens keep their M-RoPE positions, the glimpse is last + 1, the t-th generated
    token is last + 1 + t.
The glimpse's attention logits are computed from the layer's own projections (q . k / sqrt(d)), and the
ViT features come from `output_hidden_states` (not from the engine's hooks).
"""
from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb, repeat_kv
from transformers.vision_utils import get_vision_window_index

from workers.modeling.api import GenerationRequest, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.keep_rule import KeepRule, keep_mask

from engine_helpers import patterned_image

MAX_NEW = 6


def make_requests():
    return [
        GenerationRequest(images=(patterned_image(112, 84, 1),), prompt="What color is the circle?"),
        GenerationRequest(images=(patterned_image(56, 56, 2), patterned_image(84, 112, 3)), prompt="How many squares are there?"),
        GenerationRequest(images=(patterned_image(140, 56, 4),), prompt="Describe the image."),
    ]


def processor_batch(engine, requests):
    texts, images = [], []
    for req in requests:
        content = [{"type": "image"} for _ in req.images] + [{"type": "text", "text": req.prompt}]
        texts.append(engine.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True))
        images.extend(req.images)
    engine.processor.tokenizer.padding_side = "left"
    return engine.processor(text=texts, images=images, padding=True, return_tensors="pt")


def stock_new_tokens(model, batch, engine, max_new):
    out = model.generate(
        **batch, max_new_tokens=max_new, do_sample=False, eos_token_id=engine.eos_ids, pad_token_id=engine.pad_id
    )
    rows = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        kept = []
        for tok in row:
            kept.append(tok)
            if tok in engine.eos_ids:
                break
        rows.append(kept)
    return rows


@torch.inference_mode()
def reference_generate(model, modules, batch, rule, max_new, eos_ids):
    """Slow single-sample GlimpsePrune (see module docstring). Returns keep, logits, first logits, tokens."""
    cfg = modules.config
    lm, visual = model.model.language_model, model.model.visual
    ids, grid = batch["input_ids"], batch["image_grid_thw"]
    assert ids.shape[0] == 1 and int(batch["attention_mask"].min()) == 1
    n_prompt = ids.shape[1]
    is_image = ids[0] == model.config.image_token_id
    vis = visual(batch["pixel_values"], grid_thw=grid, output_hidden_states=True)
    embeds = lm.embed_tokens(ids).clone()
    embeds[0, is_image] = vis.pooler_output
    window_index, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
    order = torch.argsort(window_index)
    feats = [vis.hidden_states[i + 1].view(-1, 4, vis.hidden_states[0].shape[-1]).mean(1)[order] for i in cfg.selected_visual_layers]
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=grid)
    last = int(pos[:, 0, -1].max())
    glimpse = [modules.glimpse_vector(i) for i in range(len(lm.layers))]

    # Glimpse pass: layers 0..K on [prompt, glimpse] with a plain causal mask.
    h = torch.cat([embeds, glimpse[0][None]], dim=1)
    p = torch.cat([pos, torch.full((3, 1, 1), last + 1)], dim=2)
    rope = lm.rotary_emb(h, p)
    n = n_prompt + 1
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    attn_rows = []
    for i in range(cfg.reduce_layer + 1):
        if i > 0 and glimpse[i] is not None:
            h[0, -1] += glimpse[i][0]
        layer = lm.layers[i]
        if i in cfg.selected_layers:
            x = layer.input_layernorm(h)
            sa = layer.self_attn
            q = sa.q_proj(x).view(1, n, -1, sa.head_dim).transpose(1, 2)
            k = sa.k_proj(x).view(1, n, -1, sa.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *rope)
            k = repeat_kv(k, sa.num_key_value_groups)
            scores = (q[0, :, -1:] @ k[0].transpose(-1, -2))[:, 0] / sa.head_dim**0.5  # [H, n]
            attn_rows.append(scores[:, :n_prompt][:, is_image].T)
        h = layer(h, attention_mask=causal, position_embeddings=rope)
    grids = [tuple(g) for g in (grid[:, 1:] // 2).tolist()]
    logits = modules.attn_fuser(torch.cat(attn_rows, dim=-1), feats, grids)
    keep = keep_mask(logits, rule)
    keep_tok = torch.ones(n_prompt, dtype=torch.bool)
    keep_tok[is_image] = keep

    tokens, step_logits_all = [], []
    for step in range(max_new):
        n = n_prompt + 1 + len(tokens)
        gen_ids = torch.tensor([tokens], dtype=torch.long).view(1, -1)
        h = torch.cat([embeds, glimpse[0][None], lm.embed_tokens(gen_ids)], dim=1)
        gen_pos = (last + 1 + torch.arange(len(tokens))).view(1, 1, -1).expand(3, 1, -1)
        p = torch.cat([pos, torch.full((3, 1, 1), last + 1), gen_pos], dim=2)
        rope = lm.rotary_emb(h, p)
        early = torch.ones(n, n, dtype=torch.bool).tril()
        early[:, n_prompt] = False  # nobody sees the glimpse ...
        early[n_prompt + 1:, :n_prompt] &= keep_tok  # generated tokens never see pruned tokens
        late = early.clone()
        late[:n_prompt, :n_prompt] &= keep_tok  # after layer K, prompt tokens see only kept tokens
        for m in (early, late):
            m.fill_diagonal_(True)  # ... but itself; every row sees at least itself
        for i, layer in enumerate(lm.layers):
            if i > 0 and glimpse[i] is not None:
                h[0, n_prompt] += glimpse[i][0]
            mask = early if i <= cfg.reduce_layer else late
            h = layer(h, attention_mask=mask[None, None], position_embeddings=rope)
        row = n_prompt - 1 if not tokens else n - 1
        step_logits = model.lm_head(lm.norm(h[:, row]))[0].float()
        step_logits_all.append(step_logits)
        tokens.append(int(step_logits.argmax()))
        if tokens[-1] in eos_ids:
            break
    return keep, logits, step_logits_all, tokens


def test_plain_batch_matches_stock_generate(tiny_model, tiny_processor):
    engine = GlimpseEngine(tiny_model, tiny_processor)
    batch = processor_batch(engine, make_requests())
    assert int(batch["attention_mask"].min()) == 0, "the batch must need padding"
    expected = stock_new_tokens(tiny_model, batch, engine, MAX_NEW)
    results = engine.generate_from_inputs(dict(batch), SamplingParams(max_new_tokens=MAX_NEW), prune=False)
    assert [r.token_ids for r in results] == expected
    assert all(r.keep_ratio == 1.0 and r.kept_tokens == r.visual_tokens for r in results)


def test_keep_everything_glimpse_matches_stock_generate(tiny_model, tiny_processor, tiny_modules):
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules, KeepRule(fixed_remain_ratio=1.0))
    batch = processor_batch(engine, make_requests())
    expected = stock_new_tokens(tiny_model, batch, engine, MAX_NEW)
    results = engine.generate_from_inputs(dict(batch), SamplingParams(max_new_tokens=MAX_NEW))
    assert [r.token_ids for r in results] == expected
    assert all(r.keep_ratio == 1.0 for r in results)


@pytest.mark.parametrize("rule", [KeepRule(), KeepRule(fixed_remain_ratio=0.25), KeepRule(threshold=0.6, max_remain_ratio=0.3)])
def test_pruned_batch_matches_reference_and_batch_of_one(tiny_model, tiny_processor, tiny_modules, rule):
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules, rule)
    requests = make_requests()
    batched = engine.generate(requests, SamplingParams(max_new_tokens=MAX_NEW), return_masks=True)
    ratios = [r.keep_ratio for r in batched]
    assert any(0.0 < k < 1.0 for k in ratios), f"pruning should drop some tokens: {ratios}"
    for req, got in zip(requests, batched):
        single = engine.generate([req], SamplingParams(max_new_tokens=MAX_NEW), return_masks=True)[0]
        assert got.token_ids == single.token_ids
        assert torch.equal(got.keep_mask, single.keep_mask)
        torch.testing.assert_close(got.importance_logits, single.importance_logits, atol=1e-5, rtol=1e-5)

        batch1 = processor_batch(engine, [req])
        keep, logits, _, tokens = reference_generate(
            tiny_model, tiny_modules, batch1, rule, MAX_NEW, engine.eos_ids
        )
        torch.testing.assert_close(got.importance_logits, logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.keep_mask, keep)
        assert got.token_ids == tokens
        assert got.kept_tokens == int(keep.sum()) and sum(got.kept_per_image) == got.kept_tokens


@torch.inference_mode()
def test_pruned_step_logits_match_reference(tiny_model, tiny_processor, tiny_modules):
    """Every step's logits of the batched fast path (prefill + cached decode) equal the reference's."""
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules, KeepRule(fixed_remain_ratio=0.3))
    requests = make_requests()
    refs = [
        reference_generate(tiny_model, tiny_modules, processor_batch(engine, [req]), engine.rule, MAX_NEW, engine.eos_ids)
        for req in requests
    ]
    state = engine.core.prefill(engine._to_device(engine.build_inputs(requests)), engine.rule)
    logits, pad = state.logits, state.pad_mask
    steps = min(len(ref[3]) for ref in refs)
    assert steps >= 3
    for step in range(steps):
        for row, ref in enumerate(refs):
            torch.testing.assert_close(logits[row], ref[2][step], atol=1e-4, rtol=1e-4)
        forced = torch.tensor([ref[3][step] for ref in refs])  # teacher-forced with the reference tokens
        pad = torch.cat([pad, pad.new_ones(len(refs), 1)], dim=1)
        logits = engine.core.decode_step(forced, state.next_positions + step, pad, state.cache)


def test_text_only_and_mixed_rows(tiny_model, tiny_processor, tiny_modules):
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules)
    requests = [GenerationRequest(prompt="Describe the image."), make_requests()[0]]
    results = engine.generate(requests, SamplingParams(max_new_tokens=3))
    assert results[0].visual_tokens == 0 and results[0].keep_ratio == 1.0
    assert results[1].visual_tokens > 0
    alone = engine.generate(requests[1:], SamplingParams(max_new_tokens=3))[0]
    assert results[1].token_ids == alone.token_ids


def test_sampling_is_seeded_and_respects_limits(tiny_model, tiny_processor, tiny_modules):
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules)
    requests = make_requests()
    sampling = SamplingParams(max_new_tokens=5, temperature=1.5, top_p=0.9, seed=7)
    first = engine.generate(requests, sampling)
    again = engine.generate(requests, sampling)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    other = engine.generate(requests, SamplingParams(max_new_tokens=5, temperature=1.5, top_p=0.9, seed=8))
    assert [r.token_ids for r in first] != [r.token_ids for r in other]
    assert all(1 <= r.output_tokens <= 5 for r in first)
    assert all(r.finish_reason in ("stop", "length") for r in first)


def test_right_padding_is_refused(tiny_model, tiny_processor):
    engine = GlimpseEngine(tiny_model, tiny_processor)
    batch = dict(processor_batch(engine, make_requests()[:2]))
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        engine.generate_from_inputs(batch)


def test_regrouped_glimpse_rows_match_one_batch(tiny_model, tiny_processor, tiny_modules):
    """Rows glimpsed in different batches and finished together (the pipeline's regrouping) give the
    same tokens and masks as one plain batch."""
    engine = GlimpseEngine(tiny_model, tiny_processor, tiny_modules, KeepRule(threshold=0.5))
    requests = make_requests()
    sampling = SamplingParams(max_new_tokens=MAX_NEW)
    whole = engine.generate(requests, sampling, return_masks=True)
    rows_a, secs_a = engine.glimpse(engine.build_inputs(requests[:1]))
    rows_b, secs_b = engine.glimpse(engine.build_inputs(requests[1:]))
    order = [2, 0, 1]
    rows = [(rows_a + rows_b)[i] for i in order]
    regrouped = engine.generate_from_rows(rows, sampling, glimpse_s=[secs_a, secs_b, secs_b], return_masks=True)
    for i, got in zip(order, regrouped):
        assert got.token_ids == whole[i].token_ids
        assert torch.equal(got.keep_mask, whole[i].keep_mask)
        assert got.prompt_tokens == whole[i].prompt_tokens and got.prefill_s > 0
