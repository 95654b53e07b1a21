"""GlimpsePrune training on the tiny random model: the training forward against the inference path and
against the stock decoder, gradient routing, learning, checkpoint round trips and the JSONL reader."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig

from workers.toyworld import WorldConfig, make_sample, row_images
from workers.modeling.api import GenerationRequest, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.glimpse import GlimpseModules
from workers.modeling.keep_rule import KeepRule
from workers.modeling.qwen2_5_vl import QwenGlimpseModel
from workers.modeling.tiny import TinySpec, build_tiny_model
from workers.training.data import _WORDS, IGNORE_INDEX, BatchEncoder
from workers.training.glimpse_trainer import (
    GlimpseTrainer, LossConfig, SyntheticSource, TrainConfig, VisualCoTSource, build_batch, glimpse_loss,
    insert_glimpse, new_glimpse_config, run_training, training_forward,
)

from engine_helpers import random_modules

WORLD = WorldConfig(image_size=112, max_objects=4, seed=3)  # 4x4 merged tokens per image


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """A private tiny model: training freezes it, which must not touch the session fixture."""
    return build_tiny_model(TinySpec(rope_theta=10_000.0), seed=0)


@pytest.fixture(scope="module")
def encoder(tiny_processor):
    return BatchEncoder(tiny_processor)


def samples(n=3, long_answer=True):
    out = [make_sample(WORLD, i) for i in range(n)]
    if long_answer:  # rows with different answer lengths put the glimpse at different slots
        out[1] = dataclasses.replace(out[1], answer="a red circle, a blue square and a green star")
    return out


def test_insert_glimpse_slots_and_positions():
    labels = torch.tensor([[-100, -100, -100, 7, 8], [-100, -100, 5, 6, 9]])
    pos = torch.arange(5).repeat(3, 2, 1) + torch.tensor([0, 10, 20]).view(3, 1, 1)  # [3, 2, 5]
    embeds = torch.arange(10.0).view(2, 5, 1)
    seq = insert_glimpse(embeds, pos, torch.ones(2, 5, dtype=torch.long), labels, labels == 99, torch.full((1, 1), -1.0))
    assert seq.index.tolist() == [3, 2]
    assert seq.hidden[..., 0].tolist() == [[0, 1, 2, -1, 3, 4], [5, 6, -1, 7, 8, 9]]
    assert seq.positions[1].tolist() == [[10, 11, 12, 13, 14, 15], [10, 11, 12, 13, 14, 15]]
    assert seq.labels.tolist() == [[-100, -100, -100, -100, 7, 8], [-100, -100, -100, 5, 6, 9]]


def test_training_importance_logits_equal_inference(model, tiny_processor, encoder):
    """The glimpse before the answer sees exactly the inference prompt: same VIP logits per sample."""
    modules = random_modules(model, seed=1)
    rows = samples()
    batch = build_batch(encoder, rows)
    core = QwenGlimpseModel(model, modules)
    with torch.no_grad():
        got = training_forward(core, batch).importance_logits
        engine = GlimpseEngine(model, tiny_processor, modules)
        inputs = engine.build_inputs([GenerationRequest(images=(s.image,), prompt=s.question) for s in rows])
        assert inputs.input_ids.shape[1] < batch.inputs.input_ids.shape[1]
        expected = [r.importance_logits for r in core.glimpse_stage(inputs, KeepRule())]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_two_image_rows_train_on_what_inference_sees(model, tiny_processor, encoder):
    """Rows with one and two images in one batch: the training forward's VIP logits cover every visual
    token of the row and equal the engine's; the box mask lies on the asked image only."""
    modules = random_modules(model, seed=2)
    world = dataclasses.replace(WORLD, two_image_share=0.5)
    pool = [make_sample(world, i) for i in range(12)]
    rows = [s for s in pool if s.images][:2] + [s for s in pool if not s.images][:1]
    batch = build_batch(encoder, rows)
    core = QwenGlimpseModel(model, modules)
    with torch.no_grad():
        got = training_forward(core, batch).importance_logits
        inputs = GlimpseEngine(model, tiny_processor, modules).build_inputs(
            [GenerationRequest(images=row_images(s), prompt=s.question) for s in rows])
        expected = [r.importance_logits for r in core.glimpse_stage(inputs, KeepRule())]
    for s, g, e, box in zip(rows, got, expected, batch.box_masks):
        assert g.numel() == box.numel() == 16 * len(row_images(s))
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
        if s.images:
            assert not box[16 * (1 - s.target):16 * (2 - s.target)].any()


def test_lm_loss_equals_stock_decoder_with_inserted_glimpse(model, encoder):
    """With le_layers=(0,) the training forward is the stock decoder on [prompt, e_0, answer] with the
    answer shifted +1; an unshifted sequence gives a different loss (the check sees positions)."""
    modules = random_modules(model, seed=2, le_layers=(0,))
    core = QwenGlimpseModel(model, modules)
    batch = build_batch(encoder, samples()[1:2])
    with torch.no_grad():
        got = training_forward(core, batch).lm_loss
        embeds, _ = core.embed(batch.inputs, ())
        pos = core.positions(batch.inputs)
        start = int((batch.labels[0] != IGNORE_INDEX).nonzero()[0])
        targets = batch.labels[0, start:]
        h = torch.cat([embeds[:, :start], modules.glimpse_vector(0)[None], embeds[:, start:]], dim=1)

        def stock_loss(shift):
            p = torch.cat([pos[:, :, :start], pos[:, :, start - 1:start] + 1, pos[:, :, start:] + shift], dim=2)
            out = model.model.language_model(inputs_embeds=h, position_ids=p).last_hidden_state
            return torch.nn.functional.cross_entropy(model.lm_head(out)[0, start:start + len(targets)], targets)

        right, wrong = abs(float(got - stock_loss(1))), abs(float(got - stock_loss(0)))
        assert right < 1e-5 and wrong > 20 * max(right, 1e-6), (right, wrong)


def test_gradients_reach_only_the_glimpse_modules(model, encoder):
    modules = random_modules(model, seed=3).train()
    model.requires_grad_(False)
    batch = build_batch(encoder, samples())
    out = training_forward(QwenGlimpseModel(model, modules), batch)
    loss, parts = glimpse_loss(out, batch.box_masks, LossConfig())
    loss.backward()
    assert set(parts) == {"dice", "bce", "lm", "loss"}
    assert all(p.grad is None for p in model.parameters())
    for name, param in modules.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert float(param.grad.abs().sum()) > 0, name
    # every layer's glimpse vector gets gradient: layers <= K through both losses, later ones via the LM
    assert (modules.learnable_embeddings.grad.abs().sum(dim=(1, 2)) > 0).all()


def test_few_steps_reduce_the_loss_and_keep_the_base_frozen(model, tiny_processor, encoder):
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = random_modules(model, seed=4, le_dropout_prob=0.0)
    cfg = TrainConfig(lr=3e-3, warmup_ratio=0.0, batch_size=3, grad_accum=1, steps=8, log_every=1)
    source = SyntheticSource(WORLD, 3)  # every step sees the same three rows
    trainer = GlimpseTrainer(model, tiny_processor, modules, cfg, source, torch.device("cpu"))
    batch = build_batch(encoder, [source.example(i) for i in range(3)])

    def fixed_loss():
        with torch.no_grad():
            return glimpse_loss(training_forward(trainer.core, batch), batch.box_masks, cfg.loss)[1]

    before = fixed_loss()
    logs = [trainer.step() for _ in range(cfg.steps)]
    after = fixed_loss()
    assert after["dice"] < before["dice"] - 0.05 and after["bce"] < before["bce"] - 0.1, (before, after)
    assert after["lm"] < before["lm"] and after["loss"] < before["loss"]
    assert all(log["tp"] + log["fn"] == sum(int(m.sum()) for m in batch.box_masks) for log in logs)
    assert all(torch.equal(v, base_before[k]) for k, v in model.state_dict().items())


def test_save_load_and_resume_round_trip(model, tiny_processor, tmp_path):
    cfg = TrainConfig(lr=1e-3, batch_size=2, grad_accum=2, steps=2, checkpoint_every=1, log_every=1)
    source = SyntheticSource(WORLD, 10)

    def trainer():
        modules = random_modules(model, seed=5)
        torch.manual_seed(0)
        return GlimpseTrainer(model, tiny_processor, modules, cfg, source, torch.device("cpu"))

    straight = trainer()
    run_training(straight, tmp_path / "a", model.config.to_dict())
    loaded = GlimpseModules.from_directory(tmp_path / "a")
    for key, value in straight.modules.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    raw = json.loads((tmp_path / "a" / "config.json").read_text())
    assert raw["model_type"] == "qwen2_5_vl_gp" and raw["selected_layers"] == [2]
    lines = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and {"loss", "dice", "bce", "lm", "precision", "recall", "iou"} <= set(lines[0])

    # stop after one step (its checkpoint), then resume: same weights as the straight run
    first = trainer()
    first.step()
    first.save_checkpoint(tmp_path / "b" / "checkpoint", model.config.to_dict())
    resumed = trainer()
    run_training(resumed, tmp_path / "b", model.config.to_dict(), resume=True)
    for key, value in straight.modules.state_dict().items():
        torch.testing.assert_close(resumed.modules.state_dict()[key], value, atol=0, rtol=0, msg=key)

    engine = GlimpseEngine(model, tiny_processor, loaded.eval())
    result = engine.generate([GenerationRequest(images=(make_sample(WORLD, 0).image,), prompt="Describe the image.")],
                             SamplingParams(max_new_tokens=2))[0]
    assert result.visual_tokens == 16 and 1 <= result.kept_tokens <= 16


def test_visual_cot_reader_rasterises_boxes(tmp_path, encoder):
    # sides that are multiples of 28 px need no resize: 280 x 196 px -> a 10 x 7 merged-token grid,
    # 168 x 112 px -> 6 x 4 (two sizes in one batch also take the image processor's own path)
    Image.new("RGB", (280, 196), (90, 90, 90)).save(tmp_path / "a.png")
    Image.new("RGB", (168, 112), (90, 90, 90)).save(tmp_path / "b.png")
    records = [
        {"question": "Where is it?", "answer": "left", "image": "a.png", "bboxs": [[60, 30, 100, 80]], "dataset": "gqa"},
        {"question": "And now?", "answer": "both", "image": "b.png", "bboxs": [[0, 0, 10, 10], [150, 90, 168, 112]]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    source = VisualCoTSource(tmp_path / "d.jsonl", tmp_path)
    first, second = source.example(0), source.example(1)
    assert first.qtype == "gqa" and first.boxes[0] == pytest.approx([60 / 280, 30 / 196, 100 / 280, 80 / 196])
    batch = build_batch(encoder, [first, second])
    assert batch.inputs.image_grid_thw.tolist() == [[1, 14, 20], [1, 8, 12]]
    expected = torch.zeros(7, 10, dtype=torch.bool)
    expected[1:3, 2:4] = True  # x 2.14..3.57 cells, y 1.07..2.86 cells, inclusive ends
    assert torch.equal(batch.box_masks[0], expected.flatten())
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[0, 0] = True
    expected[3, 5] = True  # the second box ends on the image border: clamped to the last cell
    assert torch.equal(batch.box_masks[1], expected.flatten())
    assert int((batch.inputs.input_ids == encoder.image_token_id).sum()) == 70 + 24


def test_new_config_defaults_follow_the_released_layout():
    config = Qwen2_5_VLConfig(text_config={"num_hidden_layers": 28})  # 32 ViT blocks: like 7B
    model = SimpleNamespace(config=config)
    cfg = new_glimpse_config(model)
    assert cfg.selected_layers == (18,) and cfg.reduce_layer == 18
    assert cfg.selected_visual_layers == (31, 23, 15, 7)
    assert cfg.le_layers == tuple(range(28)) and cfg.le_dropout_prob == 0.1
    assert (cfg.attn_fuse_size, cfg.visual_cond_size, cfg.attn_fuse_num_heads) == (256, 512, 4)


def test_route_term_reads_the_glimpse_layer0_attention_on_the_question_words(model, encoder):
    """The route share equals the stock eager attention of the glimpse row at layer 0 (heads 0..1) on
    the question's shape/colour words, and the word mask marks exactly those tokens."""
    modules = random_modules(model, seed=5).eval()
    core = QwenGlimpseModel(model, modules)
    rows = samples()
    batch = build_batch(encoder, rows)
    words = batch.word_mask
    assert words.any(dim=1).all()
    for b, s in enumerate(rows):
        decoded = [encoder.tokenizer.decode([t]).strip().lower() for t in batch.inputs.input_ids[b][words[b]].tolist()]
        assert decoded and all(w in _WORDS and w in s.question.lower() for w in decoded), (decoded, s.question)
    with torch.no_grad():
        out = training_forward(core, batch, with_lm_loss=False, with_route=True)
        _, parts = glimpse_loss(out, batch.box_masks, LossConfig(route_weight=1.0), word_mask=words)
        seq = out.sequence
        model.set_attn_implementation("eager")
        try:
            stock = model.model.language_model(inputs_embeds=seq.hidden, position_ids=seq.positions, attention_mask=seq.pad,
                                               output_attentions=True)
        finally:
            model.set_attn_implementation("sdpa")
        probs = stock.attentions[0][torch.arange(len(rows)), :2, seq.index]  # [B, 2, L']
        on_words = torch.nn.functional.pad(words, (0, 1))
        want = (probs * on_words[:, None]).sum(-1).mean()
    assert parts["route_share"] == pytest.approx(float(want), abs=1e-5)
    assert parts["route"] > 0
