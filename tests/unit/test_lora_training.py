"""LoRA on the LLM trained with the glimpse modules (workers.training.lora): starts equal to the base,
gets gradient only where it is attached, the distillation term is zero at the start, and the saved
adapter merged by the loader (GlimpsePrune+ path) gives the adapted model's outputs."""
from __future__ import annotations

import copy

import pytest
import torch

from workers.modeling.loading import ADAPTER_CONFIG, merge_lora
from workers.modeling.qwen2_5_vl import QwenGlimpseModel
from workers.modeling.tiny import TinySpec, build_tiny_model
from workers.toyworld import WorldConfig
from workers.training import lora as lora_lib
from workers.training.data import BatchEncoder
from workers.training.glimpse_trainer import (
    GlimpseTrainer, LossConfig, SyntheticSource, TrainConfig, build_batch, embed_batch, plain_answer_logits,
    run_training, training_forward,
)
from workers.training.lora import LoraConfig

from engine_helpers import random_modules

WORLD = WorldConfig(image_size=112, max_objects=4, seed=3)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def model():
    return build_tiny_model(TinySpec(rope_theta=10_000.0), seed=0)


def test_attached_lora_starts_equal_and_only_it_and_the_modules_get_gradient(model, tiny_processor):
    encoder = BatchEncoder(tiny_processor)
    batch = build_batch(encoder, [SyntheticSource(WORLD, 3).example(i) for i in range(3)])
    modules = random_modules(model, seed=3, le_dropout_prob=0.0).train()
    core = QwenGlimpseModel(model, modules)
    with torch.no_grad():
        before = training_forward(core, batch).answer_logits
    model.requires_grad_(False)
    wrapped = lora_lib.attach(model, LoraConfig(layers=(0, 1), targets=("q_proj", "k_proj"), rank=4), seed=0)
    assert len(wrapped) == 4 and all(".layers.0." in p or ".layers.1." in p for p in wrapped)
    out = training_forward(core, batch)
    torch.testing.assert_close(out.answer_logits, before, atol=0, rtol=0)  # B = 0 at the start
    (out.lm_loss + sum(lg.sum() for lg in out.importance_logits)).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    # B = 0: A gets no gradient on the first step, B does
    assert all(float(w.lora_B.grad.abs().sum()) > 0 for w in wrapped.values())


def test_distilled_lora_training_saves_an_adapter_the_loader_merges(model, tiny_processor, tmp_path):
    pristine = copy.deepcopy(model)
    cfg = TrainConfig(lr=5e-3, warmup_ratio=0.0, batch_size=3, grad_accum=1, steps=4, log_every=1,
                      loss=LossConfig(le_weight=0.0, distill_weight=1.0),
                      lora=LoraConfig(layers=(0, 1), targets=("q_proj", "k_proj", "v_proj"), rank=4))
    modules = random_modules(model, seed=4, le_dropout_prob=0.0)
    trainer = GlimpseTrainer(model, tiny_processor, modules, cfg, SyntheticSource(WORLD, 3), torch.device("cpu"))
    first = trainer.step()
    assert abs(first["kl"]) < 1e-6  # the adapted model starts as the teacher
    final = run_training(trainer, tmp_path / "out", model.config.to_dict())
    assert "kl" in final and final["kl"] > 0  # it moved, and the distillation term measured it
    assert (tmp_path / "out" / ADAPTER_CONFIG).is_file()

    batch = build_batch(BatchEncoder(tiny_processor), [SyntheticSource(WORLD, 3).example(i) for i in range(3)])
    with torch.no_grad():
        adapted = training_forward(trainer.core, batch).answer_logits
        adapted_plain = plain_answer_logits(trainer.core, batch, embed_batch(trainer.core, batch))
    assert merge_lora(pristine, tmp_path / "out") == 6
    with torch.no_grad():
        merged_core = QwenGlimpseModel(pristine, trainer.modules)
        merged = training_forward(merged_core, batch).answer_logits
        merged_plain = plain_answer_logits(merged_core, batch, embed_batch(merged_core, batch))
        lora_lib.set_enabled(trainer.lora, False)
        plain = training_forward(trainer.core, batch).answer_logits
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged_plain, adapted_plain, atol=1e-4, rtol=1e-4)
    assert float((plain - adapted).abs().max()) > 1e-3  # the comparison above can fail


def test_resume_restores_the_adapter(model, tiny_processor, tmp_path):
    cfg = TrainConfig(lr=5e-3, warmup_ratio=0.0, batch_size=2, grad_accum=1, steps=2, log_every=1, checkpoint_every=1,
                      loss=LossConfig(le_weight=0.0, distill_weight=1.0), lora=LoraConfig(layers=(1,), rank=2))
    source = SyntheticSource(WORLD, 4)

    def trainer():
        m = build_tiny_model(TinySpec(rope_theta=10_000.0), seed=0)
        torch.manual_seed(0)
        return GlimpseTrainer(m, tiny_processor, random_modules(m, seed=5, le_dropout_prob=0.0), cfg, source, torch.device("cpu"))

    straight = trainer()
    run_training(straight, tmp_path / "a", straight.model.config.to_dict())
    first = trainer()
    first.step()
    first.save_checkpoint(tmp_path / "b" / "checkpoint", first.model.config.to_dict())
    resumed = trainer()
    run_training(resumed, tmp_path / "b", resumed.model.config.to_dict(), resume=True)
    for key, value in lora_lib.state_dict(straight.lora).items():
        torch.testing.assert_close(lora_lib.state_dict(resumed.lora)[key], value, atol=0, rtol=0, msg=key)


def test_locate_probe_scores_a_planted_pointer(model, tiny_processor):
    """The probe's `which` AUC is 1 for a score that is high exactly on the asked object's tokens and
    0.5-ish for a random one; run_probe runs end to end on the tiny model."""
    import numpy as np

    from workers.training.locate_probe import auc, row_aucs, run_probe

    relevant = np.array([1, 1, 0, 0, 0, 0], bool)
    objects = np.array([1, 1, 1, 1, 0, 0], bool)
    planted = np.array([5.0, 4.0, 1.0, 0.0, 3.0, 3.0])
    got = row_aucs(planted, relevant, objects)["score"]
    assert got["which"] == 1.0 and got["objectness"] == 0.5  # objects {5,4,1,0} vs background {3,3}
    assert auc(np.array([1.0]), np.array([1.0])) == 0.5 and auc(np.array([]), np.array([1.0])) is None

    modules = random_modules(model, seed=6, le_dropout_prob=0.0)
    summary = run_probe(QwenGlimpseModel(model, modules), BatchEncoder(tiny_processor), WORLD, rows=6, batch_size=3)
    assert "vip|-|score|objectness" in summary and summary["vip|-|score|objectness"]["all"]["n"] >= 1
    layers = {k.split("|")[1] for k in summary if k.startswith("last_token|")}
    assert layers == {str(i) for i in range(len(model.model.language_model.layers))}


def test_plain_answer_logits_are_the_stock_decoder_on_the_sequence_without_glimpse(model, tiny_processor):
    """The distillation target: the stock decoder + head on [prompt, answer] (the engine's embeddings and
    M-RoPE positions, as the LM-loss test of test_glimpse_trainer), logits at the positions that predict
    the answer tokens; with the glimpse inserted they differ (the check can fail)."""
    rows = [SyntheticSource(WORLD, 3).example(i) for i in range(3)]
    batch = build_batch(BatchEncoder(tiny_processor), rows)
    core = QwenGlimpseModel(model, random_modules(model, seed=7, le_dropout_prob=0.0))
    inputs = batch.inputs
    with torch.no_grad():
        embedded = embed_batch(core, batch)
        got = plain_answer_logits(core, batch, embedded)
        hidden = model.model.language_model(inputs_embeds=embedded[0], position_ids=embedded[2],
                                            attention_mask=inputs.attention_mask).last_hidden_state
        expected = model.lm_head(hidden).float()[:, :-1][batch.labels[:, 1:] != -100]
        with_glimpse = training_forward(core, batch).answer_logits
    assert got.shape[0] == int((batch.labels != -100).sum())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert float((with_glimpse - expected).abs().max()) > 1e-3
