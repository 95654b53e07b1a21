"""The base-model training script: it learns, it resumes where it stopped, its output loads; and the
shipped small model answers easy held-out questions through the engine."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from workers.toyworld import WorldConfig, generate_samples, row_images, row_scenes
from workers.modeling.api import GenerationRequest, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.tiny import build_processor, build_tiny_model, load_processor
from workers.training import train_base
from workers.training.data import IGNORE_INDEX, BatchEncoder, image_patches
from workers.training.train_base import HELDOUT_SEED, TrainConfig, build_heads, build_optimizer, train_step

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "small-qwen2_5_vl"

# A run small enough for a unit test: the 0.34M-parameter spec, 112 px scenes (16 visual tokens).
TINY_RUN = dict(preset="test", image_size=112, steps=6, vision_warmup_steps=2, vision_batch_size=2,
                batch_size=2, questions_per_image=2, eval_every=3, eval_per_type=2, final_eval_per_type=0,
                checkpoint_every=2, log_every=2, data_workers=0, threads=1)


def _tiny_cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY_RUN, **overrides})


pytestmark = pytest.mark.usefixtures("one_thread")


def test_prompt_ids_and_pixels_match_the_processor():
    cfg = _tiny_cfg()
    processor = build_processor(max_pixels=cfg.image_size**2, spec=cfg.spec)
    samples = train_base.training_samples(cfg, step=3, max_objects=4)
    batch = BatchEncoder(processor).encode(samples)
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
                for s in samples]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    processor.tokenizer.padding_side = "left"
    images = [s.image for s in samples]
    ref = processor(text=texts, images=images, padding=True, return_tensors="pt")
    for row in range(len(samples)):
        prompt = batch.input_ids[row][batch.attention_mask[row].bool() & (batch.labels[row] == IGNORE_INDEX)]
        assert torch.equal(prompt, ref["input_ids"][row][ref["attention_mask"][row].bool()])
        answer = batch.input_ids[row][batch.labels[row] != IGNORE_INDEX]
        assert processor.tokenizer.decode(answer) == samples[row].answer + "<|im_end|>"
    # Questions about one scene share its image: pixel rows of image j = the processor's for row 2j.
    assert batch.pixel_values.shape[0] * cfg.questions_per_image == ref["pixel_values"].shape[0]
    per_image = ref["pixel_values"].shape[0] // len(samples)
    for j in range(len(samples) // cfg.questions_per_image):
        got = batch.pixel_values[j * per_image:(j + 1) * per_image]
        want = ref["pixel_values"][2 * j * per_image:(2 * j + 1) * per_image]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_two_image_rows_encode_as_the_processor_does():
    cfg = _tiny_cfg(two_image_share=0.5, batch_size=3, vision_warmup_steps=0)
    processor = build_processor(max_pixels=cfg.image_size**2, spec=cfg.spec)
    # The first step whose batch mixes one- and two-image rows (rows of different lengths and image counts).
    samples = next(b for b in (train_base.training_samples(cfg, step=k, max_objects=4) for k in range(20))
                   if {len(row_images(s)) for s in b} == {1, 2})
    counts = [len(row_images(s)) for s in samples]
    batch = BatchEncoder(processor).encode(samples)
    messages = [[{"role": "user", "content": [{"type": "image"}] * len(row_images(s)) + [{"type": "text", "text": s.question}]}]
                for s in samples]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    processor.tokenizer.padding_side = "left"
    ref = processor(text=texts, images=[i for s in samples for i in row_images(s)], padding=True, return_tensors="pt")
    for row in range(len(samples)):
        prompt = batch.input_ids[row][batch.attention_mask[row].bool() & (batch.labels[row] == IGNORE_INDEX)]
        assert torch.equal(prompt, ref["input_ids"][row][ref["attention_mask"][row].bool()])
    # Each row lists its own images in prompt order (one slot per distinct image: the questions of one
    # scene share it), its pixels are that image's, and its box cells are True only on the asked image.
    assert batch.image_index.numel() == sum(counts)
    slot_image: dict = {}
    at, per_image = 0, batch.pixel_values.shape[0] // batch.image_grid_thw.shape[0]
    for row, s in enumerate(samples):
        for k, (slot, image) in enumerate(zip(batch.image_index[at:at + counts[row]].tolist(), row_images(s))):
            assert slot_image.setdefault(slot, id(image)) == id(image)
            want, _ = image_patches([image], processor.image_processor)
            torch.testing.assert_close(batch.pixel_values[slot * per_image:(slot + 1) * per_image], want)
            if k != (s.target if s.images else 0):
                assert not batch.box_cells[row, k * 16:(k + 1) * 16].any()
        at += counts[row]
    assert len(slot_image) == batch.image_grid_thw.shape[0] == len({id(i) for s in samples for i in row_images(s)})
    # Held-out sets: one image per row for each question type, plus a two-image set.
    heldout = train_base.heldout_samples(cfg.image_size, 2, cfg.make_world(0))
    assert {len(row_images(s)) for k, v in heldout.items() if k != "two_image" for s in v} == {1}
    assert [len(row_images(s)) for s in heldout["two_image"]] == [2, 2]
    # A training step runs on the mixed batch (shield and pruned rows included).
    model, heads = build_tiny_model(cfg.spec, seed=0), build_heads(cfg)
    out = train_step(model, heads, build_optimizer(model, heads, cfg), batch,
                     dataclasses.replace(cfg, shield_layer=1, prune_rows=0.5, prune_layer=1), step=1)
    assert torch.isfinite(torch.tensor(out.lm_loss))


def test_loss_decreases_on_a_fixed_batch():
    cfg = _tiny_cfg(vision_warmup_steps=0, freeze_vision=False, warmup_steps=1, lr=3e-3)
    torch.manual_seed(0)
    processor = build_processor(max_pixels=cfg.image_size**2, spec=cfg.spec)
    batch = BatchEncoder(processor).encode(train_base.training_samples(cfg, step=0, max_objects=2))
    model, heads = build_tiny_model(cfg.spec, seed=0), build_heads(cfg)
    optimizer = build_optimizer(model, heads, cfg)
    losses = [train_step(model, heads, optimizer, batch, cfg, step=1) for _ in range(8)]
    assert losses[-1].lm_loss < 0.7 * losses[0].lm_loss
    assert losses[-1].cell_loss < losses[0].cell_loss


def _run(tmp: Path, *extra: str) -> int:
    args = ["--out", str(tmp / "model"), "--checkpoint-dir", str(tmp / "ckpt"), "--skip-engine-eval"]
    for key, value in TINY_RUN.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return train_base.main(args + list(extra))


def test_stop_resume_and_load(tmp_path, monkeypatch):
    # Uninterrupted reference run.
    assert _run(tmp_path / "ref") == 0
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ref" / "model")

    # Stopped during step 5 (0-based 4): the last checkpoint is after step 4.
    real_step, calls = train_base.train_step, []

    def stopping_step(*args, **kwargs):
        calls.append(kwargs.get("step", args[-1]))
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_base, "train_step", stopping_step)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "stopped", "--keep-checkpoints")
    saved = torch.load(tmp_path / "stopped" / "ckpt" / "last.pt", weights_only=False)
    assert saved["state"]["step"] == 4

    calls.clear()
    monkeypatch.setattr(train_base, "train_step", lambda *a, **k: (calls.append(k.get("step", a[-1])),
                                                                    real_step(*a, **k))[1])
    assert _run(tmp_path / "stopped", "--resume") == 0
    assert calls == [4, 5]  # continued at the saved step, not from 0
    out = tmp_path / "stopped" / "model"
    assert not (tmp_path / "stopped" / "ckpt").exists()  # removed after a finished run
    summary = json.loads((out / train_base.SUMMARY_FILE).read_text())
    assert summary["steps"] == 6 and summary["curve_teacher_forced"]

    resumed = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    load_processor(out)
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_stop_at_then_resume_equals_one_run(tmp_path):
    """--stop-at leaves a checkpoint and no model; --resume finishes on the same schedule."""
    assert _run(tmp_path / "ref") == 0
    assert _run(tmp_path / "cut", "--stop-at", "3", "--keep-checkpoints") == 0
    assert not (tmp_path / "cut" / "model").exists()
    assert torch.load(tmp_path / "cut" / "ckpt" / "last.pt", weights_only=True)["state"]["step"] == 3
    assert _run(tmp_path / "cut", "--resume") == 0
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ref" / "model").state_dict()
    resumed = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "cut" / "model").state_dict()
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-5, rtol=1e-4, msg=name)


def _easy_rows(n: int) -> list:
    """Single-object attribute / existence questions from a held-out seed (training uses seed 0)."""
    world = WorldConfig(max_objects=1, question_mix=(("attribute", 0.5), ("existence", 0.5)), seed=HELDOUT_SEED + 7)
    return [s for s in generate_samples(world, 3 * n) if s.qtype in ("attribute", "existence")][:n]


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(),
                    reason=f"no shipped model at {SHIPPED}; make it with python -m workers.training.train_base")
def test_shipped_model_answers_easy_heldout_questions():
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(SHIPPED, attn_implementation="sdpa")
    engine = GlimpseEngine(model.float().eval(), load_processor(SHIPPED))
    rows = _easy_rows(10)
    results = engine.generate([GenerationRequest(images=(s.image,), prompt=s.question) for s in rows],
                              SamplingParams(max_new_tokens=8))
    answers = [(s.question, s.answer, r.text.strip()) for s, r in zip(rows, results)]
    assert sum(want == got for _, want, got in answers) >= 8, answers
    assert sum(f.stat().st_size for f in SHIPPED.iterdir() if f.is_file()) <= 20 * 2**20


def test_init_from_continues_a_saved_model(tmp_path):
    assert _run(tmp_path / "first") == 0
    first = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "first" / "model").state_dict()
    # A second run on fresh scenes (another seed), starting from the first run's weights; a negligible
    # learning rate leaves them where they were, while the same run without --init-from does not.
    extra = ("--seed", "3", "--steps", "2", "--vision-warmup-steps", "0", "--start-max-objects", "12",
             "--lr", "1e-12", "--question-mix", "attribute=0.5,existence=0.5")
    assert _run(tmp_path / "cont", *extra, "--init-from", str(tmp_path / "first" / "model")) == 0
    assert _run(tmp_path / "scratch", *extra) == 0
    cont = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "cont" / "model").state_dict()
    scratch = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "scratch" / "model").state_dict()
    for name, value in first.items():
        torch.testing.assert_close(cont[name], value, atol=1e-6, rtol=0, msg=name)
    assert any(not torch.allclose(scratch[n], v) for n, v in first.items())
    summary = json.loads((tmp_path / "cont" / "model" / train_base.SUMMARY_FILE).read_text())
    assert summary["config"]["init_from"].endswith("model")
    assert summary["config"]["question_mix"] == [["attribute", 0.5], ["existence", 0.5]]


def test_question_mix_argument_rejects_unknown_types():
    with pytest.raises(SystemExit):
        train_base._parse_args(["--out", "x", "--question-mix", "colour=1.0"])


def test_lookup_and_route_losses_read_the_models_own_attention():
    """The supervised shares equal the shares the stock eager attention gives, at the answer slot, the
    boxes (among the visual tokens: lookup) and the question's shape/colour words (among all: route)."""
    cfg = _tiny_cfg(questions_per_image=1, batch_size=4)
    processor = build_processor(max_pixels=cfg.image_size**2, spec=cfg.spec)
    batch = BatchEncoder(processor).encode(train_base.training_samples(cfg, step=5, max_objects=4))
    model = build_tiny_model(cfg.spec, seed=0).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():  # sharper attention than at init, so a wrong position or head shows
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    image_id = model.config.image_token_id
    prompt = batch.attention_mask * (batch.labels == IGNORE_INDEX)  # the prompts only (left padded, answer cut)
    keep = prompt.bool()
    width = int(keep.sum(1).max())
    ids = torch.stack([torch.cat([torch.full((width - int(k.sum()),), 0), r[k]]) for r, k in zip(batch.input_ids, keep)])
    mask = torch.stack([torch.cat([torch.zeros(width - int(k.sum()), dtype=torch.long), torch.ones(int(k.sum()), dtype=torch.long)]) for k in keep])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                    mm_token_type_ids=(ids == image_id).int(), output_attentions=True)
        is_image = ids == image_id
        for layer in (0, 1):
            probs = out.attentions[layer][:, :2, -1]  # [B, 2 heads, L] at the last prompt position
            shares = []
            for b in range(len(ids)):
                cells = batch.box_cells[b, :int(is_image[b].sum())]
                if cells.any():
                    vis = probs[b][:, is_image[b]]
                    shares.append(vis[:, cells].sum(-1) / vis.sum(-1))
            want = torch.cat(shares).mean()
            # Same rows with the answer appended: the loss reads position "first answer token - 1".
            types = (batch.input_ids == image_id).int()
            positions, _ = model.model.get_rope_index(batch.input_ids, mm_token_type_ids=types,
                                                      image_grid_thw=batch.image_grid_thw, attention_mask=batch.attention_mask)
            full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                         image_grid_thw=batch.image_grid_thw, mm_token_type_ids=types, output_hidden_states=True)
            loss, share = train_base.lookup_losses(model, full.hidden_states[layer], positions, batch, layer, 2)
            assert share == pytest.approx(float(want), abs=1e-5)
            assert float(loss) > 0
            # The route loss: the same query's share (over every key) on the question's shape/colour words.
            shift = (width - keep.sum(1)) - (batch.input_ids.shape[1] - batch.attention_mask.sum(1))  # [B]
            words = torch.zeros_like(mask, dtype=torch.bool)
            words[batch.word_pos[:, 0], batch.word_pos[:, 1] + shift[batch.word_pos[:, 0]]] = True
            assert bool(words.any()) and bool((ids[words] != image_id).all())
            has = words.any(1)
            want_route = (probs * words[:, None]).sum(-1)[has].mean()
            loss, share = train_base.route_losses(model, full.hidden_states[layer], positions, batch, layer, 2)
            assert share == pytest.approx(float(want_route), abs=1e-5)
            assert float(loss) > 0


def test_pruned_training_forward_equals_the_engine_with_the_same_keep_masks():
    """`run_pruned` (training) must see exactly what the engine sees when the same visual tokens are
    pruned at layer K: greedy tokens the engine decodes are the argmax of the training forward run on
    prompt + those tokens, at every step, and the first step's logits agree."""
    from engine_helpers import random_modules

    from workers.modeling.keep_rule import KeepRule
    from workers.training.evaluate import keep_mask_rows

    cfg = _tiny_cfg()
    processor = build_processor(max_pixels=cfg.image_size**2, spec=cfg.spec)
    model = build_tiny_model(cfg.spec, seed=0).eval()
    modules = random_modules(model, seed=1)
    engine = GlimpseEngine(model, processor, modules, KeepRule(0.5))
    samples = train_base.training_samples(cfg, step=2, max_objects=4)[:3]
    inputs = engine.build_inputs([GenerationRequest(images=(s.image,), prompt=s.question) for s in samples])
    gen = torch.Generator().manual_seed(0)
    keep = [torch.rand(16, generator=gen) < 0.4 for _ in samples]
    results = engine.generate_from_rows(keep_mask_rows(engine.core, inputs, keep), SamplingParams(max_new_tokens=6))
    steps = min(len(r.token_ids) for r in results)
    assert steps >= 3
    answer = torch.tensor([r.token_ids[:steps] for r in results])
    ids = torch.cat([inputs.input_ids, answer], dim=1)
    pad = torch.cat([inputs.attention_mask, torch.ones_like(answer)], dim=1)
    is_image = ids == model.config.image_token_id
    with torch.no_grad():
        feats = model.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw, return_dict=True).pooler_output
        embeds = model.model.get_input_embeddings()(ids).masked_scatter(is_image.unsqueeze(-1), torch.cat(feats))
        positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=is_image.int(),
                                                  image_grid_thw=inputs.image_grid_thw, attention_mask=pad)
        drop = torch.zeros_like(is_image)
        drop[is_image] = ~torch.cat(keep)
        answer_rows = torch.zeros_like(is_image)
        answer_rows[:, inputs.input_ids.shape[1]:] = True
        hidden, _ = train_base.run_pruned(model, embeds, pad, positions, drop, answer_rows, modules.config.reduce_layer)
        logits = model.lm_head(hidden)  # [B, L, V]
    first = inputs.input_ids.shape[1] - 1  # predicts the first answer token
    predicted = logits[:, first:first + steps].argmax(-1)
    assert torch.equal(predicted, answer)
    state = engine.core.finish_prefill(keep_mask_rows(engine.core, inputs, keep))
    torch.testing.assert_close(logits[:, first].float(), state.logits, atol=1e-4, rtol=1e-4)
    # Without pruning the same forward gives other answers: the masks matter.
    hidden_all, _ = train_base.run_pruned(model, embeds, pad, positions, torch.zeros_like(drop), answer_rows, 2)
    assert not torch.allclose(model.lm_head(hidden_all)[:, first], logits[:, first], atol=1e-3)


def test_grown_model_first_computes_what_the_smaller_one_did(tmp_path):
    """`grow_weights`: the small model's text layers moved up by `offset`, the new layers identity maps."""
    import dataclasses

    cfg = _tiny_cfg(questions_per_image=1, batch_size=3)
    small = build_tiny_model(cfg.spec, seed=3).eval()
    small.save_pretrained(tmp_path / "small")
    spec = dataclasses.replace(cfg.spec, text_num_layers=cfg.spec.text_num_layers + 3)
    grown = build_tiny_model(spec, seed=4).eval()
    train_base.grow_weights(grown, tmp_path / "small", offset=2)
    processor = build_processor(max_pixels=cfg.image_size**2, spec=cfg.spec)
    batch = BatchEncoder(processor).encode(train_base.training_samples(cfg, step=1, max_objects=4))
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                  image_grid_thw=batch.image_grid_thw, mm_token_type_ids=(batch.input_ids == small.config.image_token_id).int())
    with torch.no_grad():
        want, got = small(**inputs).logits, grown(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(grown.model.language_model.layers[2].self_attn.q_proj.weight,
                       small.model.language_model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="no place"):  # more layers than the target can take
        train_base.grow_weights(grown, tmp_path / "small", offset=4)


def test_shield_share_reads_the_models_own_attention():
    """The shielded share equals the stock eager attention's visual share of the prompt's text queries
    after the image and of the visual queries (own position excluded), averaged over layers 0..K."""
    cfg = _tiny_cfg(questions_per_image=1, batch_size=4)
    processor = build_processor(max_pixels=cfg.image_size**2, spec=cfg.spec)
    batch = BatchEncoder(processor).encode(train_base.training_samples(cfg, step=4, max_objects=4))
    model = build_tiny_model(cfg.spec, seed=0).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    image_id = model.config.image_token_id
    types = (batch.input_ids == image_id).int()
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                    image_grid_thw=batch.image_grid_thw, mm_token_type_ids=types, output_hidden_states=True,
                    output_attentions=True)
        positions, _ = model.model.get_rope_index(batch.input_ids, mm_token_type_ids=types,
                                                  image_grid_thw=batch.image_grid_thw, attention_mask=batch.attention_mask)
        loss, share = train_base.shield_losses(model, out.hidden_states, positions, batch, last_layer=1)
    is_image = types.bool()
    text = (batch.attention_mask.bool() & ~is_image & (types.cumsum(1) > 0) & (batch.labels == IGNORE_INDEX))
    queries = text | is_image
    length = is_image.shape[1]
    keys = is_image[:, None, :] & ~torch.eye(length, dtype=torch.bool)[None]  # [B, Lq, Lk]
    per_layer = []
    for layer in (0, 1):
        probs = out.attentions[layer]  # [B, h, L, L]
        vis = (probs * keys[:, None]).sum(-1)  # [B, h, L]
        per_layer.append(vis.transpose(1, 2)[queries].mean())
    assert share == pytest.approx(float(torch.stack(per_layer).mean()), abs=1e-5)
    assert 0.05 < share < 0.95 and float(loss) > 0


def test_pruned_rows_keep_whole_distractor_objects():
    """`--prune-distractors`: a pruned row keeps its asked boxes and, per other object, either all of
    that object's own box tokens or none; which objects survive varies from row to row. The objects on a
    two-image row's unasked image count as distractors, and at 0 the rule is the plain one (box tokens
    + random extras, same draws)."""
    cfg = _tiny_cfg(two_image_share=0.5, batch_size=8)
    processor = build_processor(max_pixels=cfg.image_size**2, spec=cfg.spec)
    samples = [s for k in range(6) for s in train_base.training_samples(cfg, step=k, max_objects=4)]
    batch = BatchEncoder(processor).encode(samples)
    is_image = batch.input_ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    box = train_base.box_positions(batch, is_image)
    ids = train_base.token_values(batch.distractor_cells, is_image)
    two_image = 0
    for row, s in enumerate(samples):
        objects = sum(len(o) for o in row_scenes(s))
        asked = [k for k, o in enumerate(row_scenes(s)[s.target], start=1 + sum(len(o) for o in row_scenes(s)[:s.target]))
                 if o["box"] in s.boxes]
        seen = set(ids[row].unique().tolist()) - {0}
        assert seen <= set(range(1, objects + 1)) - set(asked)
        if s.images:  # every object of the unasked image is a distractor
            two_image += 1
            tokens = is_image[row].nonzero()[:, 0]
            other = tokens[(1 - s.target) * 16:(2 - s.target) * 16]
            assert ids[row, other].any()
    assert two_image and len(samples) - two_image
    rows = torch.ones(len(samples), dtype=torch.bool)
    plain = train_base.pruned_masks(batch, is_image, rows, 0.0, torch.Generator().manual_seed(0))
    with_box = box.any(dim=1)
    assert torch.equal((is_image & ~plain)[with_box], box[with_box])  # exactly the asked boxes
    kept_objects = []
    for seed in range(4):
        drop = train_base.pruned_masks(batch, is_image, rows, 0.0, torch.Generator().manual_seed(seed), 1.0)
        keep = is_image & ~drop
        assert not (box & drop).any()  # the asked boxes always survive
        for row in range(len(samples)):
            for k in set(ids[row].unique().tolist()) - {0}:
                mine = (ids[row] == k) & ~box[row]  # an object's own tokens: all kept or all dropped
                if mine.any():
                    assert keep[row][mine].all() or not keep[row][mine].any()
                    kept_objects.append(bool(keep[row][mine].all()))
            if with_box[row]:  # nothing else survives (extra_max 0)
                assert not (keep[row] & (ids[row] == 0) & ~box[row]).any()
    assert 0.1 < sum(kept_objects) / len(kept_objects) < 0.9
    same = train_base.pruned_masks(batch, is_image, rows, 0.25, torch.Generator().manual_seed(3), 0.0)
    assert torch.equal(same, train_base.pruned_masks(batch, is_image, rows, 0.25, torch.Generator().manual_seed(3)))
