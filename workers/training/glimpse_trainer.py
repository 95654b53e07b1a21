"""GlimpsePrune training: the glimpse token and the VIP on a frozen base model (reference section 6.1).

Place in the project: this writes the glimpse-modules directory (official format: config.json +
new_modules_gp.pt) that `GlimpseModules.from_directory`, the engine and the pipeline load. It drives
the engine's own pieces (`QwenGlimpseModel.embed`, `positions`, `run_layers`, `glimpse_query`,
`_glimpse_attention`, the VIP), so training and inference compute the glimpse logits the same way.

Training forward, per batch of [prompt, answer, <|im_end|>] rows (left padded):
  * the glimpse embedding e_0 is inserted just BEFORE the first answer token (label -100); it takes
    the position last-prompt-position + 1 on all M-RoPE axes and every later token moves +1, so it is
    an ordinary inserted token; e_l is added at the glimpse before every layer l >= 1;
  * ALL layers run unpruned with a plain causal mask; at the selected layer(s) the glimpse query's raw
    attention logits over the visual keys feed the VIP -> one logit per visual token;
  * loss = loc_weight * (dice_weight * Dice(sigmoid(logits), gt) + bce_weight * BCEWithLogits(logits, gt))
         + le_weight * CE(answer tokens incl. <|im_end|>, glimpse in context),
    Dice and BCE per sample (over all of its visual tokens) then averaged over the batch; CE is the
    token mean over the batch. gt = the relevant boxes rasterised on the merged-token grid
    (`workers.toyworld.box_token_mask`). Dice = 1 - (2 sum(p g) + eps) / (sum p + sum g + eps) with
    eps = 1 (`LossConfig.dice_eps`): an empty gt mask (a "no"/"0" question about absent objects) then
    gives 1 - 1 / (sum p + 1), which pushes every probability to 0 instead of being undefined; the keep
    rule's min_remain_num keeps one token at inference.
Because attention is causal and the answer follows the glimpse, the glimpse's query and the visual
keys equal those of the inference prefill (glimpse appended after the prompt): the VIP sees exactly
the same inputs in training and inference (tested).

With `TrainConfig.lora` (`--lora-layers`), LoRA adapters on the named LLM linears train with the modules
(`workers.training.lora`; saved as a PEFT adapter next to them, the GlimpsePrune+ layout the loader
merges). `LossConfig.distill_weight` then adds KL(base || adapted) on the answer tokens of the plain
sequence (no glimpse: at inference it is dropped at layer K), the base being the same forward with the
adapters off: the adapters may change what the glimpse query and the visual keys compute at layers <= K,
while the answers stay the base's. (The reference's GlimpsePrune+ stage A
trains its LoRA by RL on pruned inputs instead.)

Deliberate differences from the reference trainer: the LM head runs only on answer positions (same
loss, less memory); with le_weight = 0 the layers after the last selected layer are skipped; no
HF Trainer: a plain loop with AdamW, cosine schedule with linear warmup, gradient clipping at 1.0
(the HF default), checkpoints and `--resume`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DynamicCache

from workers.toyworld import WorldConfig, Sample, load_world, make_sample, row_images
from workers.modeling import compat
from workers.modeling.glimpse import GlimpseConfig, GlimpseModules
from workers.modeling.loading import read_adapter
from workers.modeling.qwen2_5_vl import ModelInputs, QwenGlimpseModel
from workers.training import lora as lora_lib
from workers.training.data import IGNORE_INDEX, BatchEncoder, attention_share_loss, box_masks, image_patches, object_masks
from workers.training.lora import LoraConfig

log = logging.getLogger(__name__)
STATE_NAME = "trainer_state.pt"
CHECKPOINT_DIR = "checkpoint"
LOG_NAME = "train_log.jsonl"


# ---- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LossConfig:
    """Weights of the GlimpsePrune loss (reference defaults) and the Dice smoothing."""

    loc_weight: float = 1.0  # the mask loss (Dice + BCE)
    le_weight: float = 1.0  # the answer cross-entropy with the glimpse in context
    dice_weight: float = 1.0
    bce_weight: float = 0.1
    dice_eps: float = 1.0  # added to numerator and denominator; defines Dice of an empty mask
    distill_weight: float = 0.0  # KL(base || adapted) on the answer tokens; only with a LoRA (TrainConfig.lora)
    # Dice of the glimpse's own attention map (mean over heads and selected layers, min-max normalised per
    # sample, as the reference's ori_attn_supervision row) against the box mask: a direct signal for the
    # glimpse query and the visual keys; training only (the saved config keeps ori_attn_supervision off)
    attn_weight: float = 0.0
    # Among the scene's object tokens only, cross-entropy of the glimpse's attention (mean over heads) onto
    # the asked object's: -log(softmax mass on the relevant tokens). Rows with no relevant token, or no
    # other object, are skipped. Teaches "which object", which the box Dice mostly leaves to objectness.
    which_weight: float = 0.0
    # The glimpse's first hop: -log(its layer-0 attention share, heads 0..route_heads-1, on the question's
    # shape and colour words), the softmax over every key it attends to. A base trained with the
    # matching route + lookup losses (`train_base.route_losses`) looks the asked object up at layer 1
    # from the slot where the glimpse sits, once that slot has read the words at layer 0; the glimpse
    # must read them too. Rows without such a word are skipped.
    route_weight: float = 0.0
    route_heads: int = 2

    def __post_init__(self) -> None:
        if min(self.loc_weight, self.le_weight, self.dice_weight, self.bce_weight, self.distill_weight,
               self.attn_weight, self.which_weight, self.route_weight) < 0 or self.dice_eps <= 0:
            raise ValueError(f"loss weights must be >= 0 and dice_eps > 0, got {self}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Steps count optimizer updates; one update sees batch_size * grad_accum rows."""

    lr: float = 1e-4
    weight_decay: float = 0.0  # HF Trainer default, as the reference
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    batch_size: int = 1
    grad_accum: int = 8
    steps: Optional[int] = None  # default: epochs over the data source
    epochs: float = 1.0
    seed: int = 42
    log_every: int = 10
    checkpoint_every: int = 100
    loss: LossConfig = field(default_factory=LossConfig)
    lora: Optional[LoraConfig] = None  # also adapt these LLM linears (GlimpsePrune+ layout, workers.training.lora)

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"need lr > 0, 0 <= warmup_ratio < 1, batch_size >= 1, grad_accum >= 1: {self}")
        if (self.steps is not None and self.steps < 1) or self.epochs <= 0:
            raise ValueError(f"steps must be >= 1 and epochs > 0, got {self.steps}, {self.epochs}")
        if self.loss.distill_weight > 0 and self.lora is None:
            raise ValueError("distill_weight > 0 needs a LoRA: without one the base is the teacher itself")

    def total_steps(self, source_size: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * source_size / (self.batch_size * self.grad_accum)))


def new_glimpse_config(model, selected_layers: Optional[Sequence[int]] = None, **overrides) -> GlimpseConfig:
    """GP config for a base model without modules yet.

    selected_layers = [K] and reduce_layer = K with K = round(2/3 * num_layers) - 1 (18 of 28, 23 of
    36, as released), or reduce_layer = max(selected_layers) when they are given; selected_visual_layers
    = the vision tower's full-attention blocks, descending; le_layers = all layers; le_dropout_prob 0.1
    (the training default); VIP sizes 256/512/4; `overrides` replace any field.
    """
    text, vision = compat.text_config(model), model.config.vision_config
    n_layers = text.num_hidden_layers
    selected = tuple(selected_layers) if selected_layers else (round(2 / 3 * n_layers) - 1,)
    values = dict(
        hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads,
        num_hidden_layers=n_layers,
        vision_hidden_size=vision.hidden_size,
        rms_norm_eps=text.rms_norm_eps,
        selected_layers=selected,
        reduce_layer=max(selected),
        selected_visual_layers=tuple(sorted(vision.fullatt_block_indexes, reverse=True)),
        le_layers=tuple(range(n_layers)),
        le_dropout_prob=0.1,
    )
    values.update(overrides)
    return GlimpseConfig(**values)


# ---- data ------------------------------------------------------------------------------------
class SyntheticSource:
    """Rows 0..size-1 of the synthetic world (`workers.toyworld.make_sample`)."""

    def __init__(self, world: WorldConfig, size: int):
        self.world, self.size = world, size

    def example(self, index: int) -> Sample:
        return make_sample(self.world, index)


class VisualCoTSource:
    """A Visual-CoT style JSONL: question, answer, image (relative to image_root), bboxs (xyxy px)."""

    def __init__(self, path: str | Path, image_root: str | Path):
        self.root = Path(image_root)
        self.records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        self.size = len(self.records)
        if not self.records:
            raise ValueError(f"{path}: no records")

    def example(self, index: int) -> Sample:
        return visual_cot_sample(self.records[index], self.root, index)


def visual_cot_sample(record: dict, image_root: Path, index: int = 0) -> Sample:
    """One JSONL record as a `Sample`: boxes normalised by the image's own width and height."""
    image = Image.open(image_root / record["image"]).convert("RGB")
    width, height = image.size
    raw = record.get("bboxs") or []
    boxes_px = [raw] if raw and not isinstance(raw[0], (list, tuple)) else raw
    boxes = [[min(max(x1 / width, 0.0), 1.0), min(max(y1 / height, 0.0), 1.0),
              min(max(x2 / width, 0.0), 1.0), min(max(y2 / height, 0.0), 1.0)] for x1, y1, x2, y2 in boxes_px]
    return Sample(
        id=str(record.get("question_id", index)), image=image, question=record["question"],
        answer=str(record["answer"]), qtype=str(record.get("dataset", "visual_cot")), boxes=boxes,
        objects=[], num_objects=len(boxes),
    )


def row_indices(size: int, seed: int, first: int, count: int) -> list[int]:
    """Rows number first..first+count-1 of the stream: epoch e is a seeded permutation of 0..size-1."""
    out, perms = [], {}
    for n in range(first, first + count):
        epoch = n // size
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(size)
        out.append(int(perms[epoch][n % size]))
    return out


@dataclass(frozen=True)
class GlimpseBatch:
    """Left-padded [prompt, answer, <|im_end|>] rows, labels on the answer, gt box mask per sample."""

    inputs: ModelInputs
    labels: torch.Tensor  # [B, L], IGNORE_INDEX outside the answer + <|im_end|>
    box_masks: list  # per sample: bool [N_v(b)], raster order of the merged-token grid
    qtypes: tuple = ()
    object_masks: tuple = ()  # per sample: bool [N_v(b)], every object of the scene (synthetic rows only)
    word_mask: Optional[torch.Tensor] = None  # bool [B, L]: the questions' shape and colour words (synthetic rows)

    def to(self, device) -> "GlimpseBatch":
        return GlimpseBatch(self.inputs.to(device), self.labels.to(device), [m.to(device) for m in self.box_masks], self.qtypes,
                            tuple(m.to(device) for m in self.object_masks),
                            None if self.word_mask is None else self.word_mask.to(device))


def build_batch(encoder: BatchEncoder, samples: Sequence[Sample]) -> GlimpseBatch:
    """Encode samples with the base model's prompt format (`BatchEncoder`, = the engine's) plus box masks."""
    images = [image for s in samples for image in row_images(s)]
    pixel_values, grid = image_patches(images, encoder.processor.image_processor)
    counts = [len(row_images(s)) for s in samples]
    starts = np.cumsum([0] + counts[:-1]).tolist()
    ids, pad, labels = encoder.answer_rows(samples, grid, [range(a, a + n) for a, n in zip(starts, counts)])
    masks = box_masks(samples, grid, encoder.merge)
    objects = tuple(object_masks(samples, grid, encoder.merge)) if all(s.objects for s in samples) else ()
    words = torch.zeros_like(pad, dtype=torch.bool)
    for b, s in enumerate(samples):  # left padded: a prompt index i sits at (width - row length) + i
        offset = pad.shape[1] - int(pad[b].sum())
        for index, _, _ in encoder.question_words(s.question, encoder.image_tokens(grid, range(starts[b], starts[b] + counts[b]))):
            words[b, offset + index] = True
    return GlimpseBatch(ModelInputs(ids, pad, pixel_values, grid), labels, masks, tuple(s.qtype for s in samples), objects, words)


# ---- the training forward --------------------------------------------------------------------
@dataclass(frozen=True)
class GlimpseSequence:
    """A batch with the glimpse inserted before each row's first answer token. L' = L + 1."""

    hidden: torch.Tensor  # [B, L', d]
    positions: torch.Tensor  # [3, B, L']
    pad: torch.Tensor  # [B, L']
    labels: torch.Tensor  # [B, L'], IGNORE_INDEX at the glimpse
    is_image: torch.Tensor  # bool [B, L']
    is_glimpse: torch.Tensor  # bool [B, L'], one True per row
    index: torch.Tensor  # [B] the glimpse slot


def insert_glimpse(embeds, positions, pad, labels, is_image, e0) -> GlimpseSequence:
    """Insert e0 [1, d] at each row's first label slot; the glimpse's position is the previous
    token's + 1 on every axis and every later token moves +1. embeds [B, L, d], positions [3, B, L]."""
    has_label = labels != IGNORE_INDEX
    if not bool(has_label.any(dim=1).all()):
        raise ValueError("every row needs at least one answer token (labels != -100)")
    bsz, length = labels.shape
    start = has_label.int().argmax(dim=1)  # [B]
    slots = torch.arange(length + 1, device=labels.device)[None]  # [1, L']
    is_glimpse = slots == start[:, None]  # [B, L']
    after = (slots > start[:, None]).long()
    src = (slots - after).clamp(max=length - 1)  # [B, L'] source slot (the glimpse borrows its successor's)
    hidden = embeds.gather(1, src[..., None].expand(-1, -1, embeds.shape[-1]))
    hidden = torch.where(is_glimpse[..., None], e0.to(hidden.dtype), hidden)
    prev = positions.gather(2, (start - 1)[None, :, None].expand(3, -1, 1)) + 1  # [3, B, 1]
    new_pos = positions.gather(2, src[None].expand(3, -1, -1)) + after[None]
    new_pos = torch.where(is_glimpse[None], prev, new_pos)
    return GlimpseSequence(
        hidden=hidden,
        positions=new_pos,
        pad=pad.gather(1, src) | is_glimpse.long(),
        labels=labels.gather(1, src).masked_fill(is_glimpse, IGNORE_INDEX),
        is_image=is_image.gather(1, src) & ~is_glimpse,
        is_glimpse=is_glimpse,
        index=start,
    )


@dataclass
class GlimpseForward:
    importance_logits: list  # per sample: float [N_v(b)]
    lm_loss: Optional[torch.Tensor]  # scalar, None when the LM loss is off
    answer_logits: Optional[torch.Tensor] = None  # [T, V] fp32 at the answer targets, with the LM loss
    attention_maps: Optional[list] = None  # per sample: mean over heads and selected layers of the raw logits [N_v(b)]
    route_logits: Optional[torch.Tensor] = None  # [B, H, L'] the glimpse's layer-0 logits over every slot
    route_keys: Optional[torch.Tensor] = None  # bool [B, L'] the slots it attends to: real ones up to itself
    sequence: Optional["GlimpseSequence"] = None


def embed_batch(core: QwenGlimpseModel, batch: GlimpseBatch) -> tuple:
    """(embeds, visual features, positions) of a batch: nothing before the LLM layers is trainable."""
    with torch.no_grad():
        embeds, feats = core.embed(batch.inputs, tuple(core.modules.config.selected_visual_layers))
        return embeds, feats, core.positions(batch.inputs)


def plain_answer_logits(core: QwenGlimpseModel, batch: GlimpseBatch, embedded: tuple) -> torch.Tensor:
    """Answer-target logits [T, V] fp32 of the plain sequence (no glimpse, no pruning): what the answers
    see at inference once the glimpse is dropped at layer K (reference step 7)."""
    embeds, _, positions = embedded
    cache = DynamicCache(config=compat.text_config(core.model))
    hidden = core.run_layers(range(len(core.lm.layers)), embeds, batch.inputs.attention_mask, positions, cache)
    answer = batch.labels[:, 1:] != IGNORE_INDEX
    return core.model.lm_head(core.lm.norm(hidden[:, :-1][answer])).float()


def training_forward(core: QwenGlimpseModel, batch: GlimpseBatch, with_lm_loss: bool = True,
                     embedded: Optional[tuple] = None, with_route: bool = False) -> GlimpseForward:
    """The one-pass training forward (module docstring). `core.modules` holds the trainable modules.
    embedded: `embed_batch`'s result when the caller already has it. with_route: also the glimpse's
    layer-0 attention logits over its keys (`LossConfig.route_weight`)."""
    modules, cfg = core.modules, core.modules.config
    inputs = batch.inputs
    embeds, feats, positions = embedded if embedded is not None else embed_batch(core, batch)
    is_image = inputs.input_ids == core.config.image_token_id
    seq = insert_glimpse(embeds, positions, inputs.attention_mask, batch.labels, is_image, modules.glimpse_vector(0))
    rows = torch.arange(seq.hidden.shape[0], device=seq.hidden.device)
    glimpse_at = seq.is_glimpse[..., None]  # [B, L', 1]
    cache = DynamicCache(config=compat.text_config(core.model))
    queries, attn_rows = {}, {}
    route = None

    def on_layer(i, h, rope, before):
        nonlocal route
        if before:
            e = modules.glimpse_vector(i) if i > 0 else None
            if e is not None:
                h = h + glimpse_at * e.to(h.dtype)
            if i in cfg.selected_layers or (with_route and i == 0):
                row_rope = (rope[0][rows, seq.index][:, None], rope[1][rows, seq.index][:, None])
                queries[i] = core.glimpse_query(i, h[rows, seq.index][:, None], row_rope)
            return h
        if with_route and i == 0:
            route = core.glimpse_logits(0, queries[0] if 0 in cfg.selected_layers else queries.pop(0), cache)
        if i in cfg.selected_layers:
            # `_glimpse_attention` drops the last key slot (the glimpse at inference); here the last
            # slot is the final answer token, never a visual one, so dropping it is harmless.
            attn_rows[i] = core._glimpse_attention(i, queries.pop(i), cache, seq.is_image[:, :-1])

    last = len(core.lm.layers) - 1 if with_lm_loss else max(cfg.selected_layers)
    hidden = core.run_layers(range(last + 1), seq.hidden, seq.pad, seq.positions, cache, on_layer)
    route_keys = None
    if with_route:  # causal, the glimpse itself included, padding excluded
        route_keys = seq.pad.bool() & (torch.arange(seq.pad.shape[1], device=seq.pad.device)[None] <= seq.index[:, None])
    attn_in = torch.cat([attn_rows[i] for i in cfg.selected_layers], dim=-1)  # [N, n_sel * H]
    grids = [tuple(g) for g in (inputs.image_grid_thw[:, 1:] // core.visual.spatial_merge_size).tolist()]
    logits = modules.attn_fuser(attn_in, feats, grids)  # [N] fp32
    sizes = [int(n) for n in seq.is_image.sum(dim=1).tolist()]
    per_sample = list(torch.split(logits, sizes))
    maps = list(torch.split(attn_in.float().mean(dim=-1), sizes))
    lm_loss = None
    if with_lm_loss:
        targets = seq.labels[:, 1:]
        answer = targets != IGNORE_INDEX  # [B, L'-1]
        lm_logits = core.model.lm_head(core.lm.norm(hidden[:, :-1][answer])).float()  # [T, V]
        lm_loss = F.cross_entropy(lm_logits, targets[answer])
        return GlimpseForward(per_sample, lm_loss, lm_logits, maps, route, route_keys, seq)
    return GlimpseForward(per_sample, lm_loss, attention_maps=maps, route_logits=route, route_keys=route_keys, sequence=seq)


# ---- loss and metrics ------------------------------------------------------------------------
def mask_losses(logits: Sequence[torch.Tensor], gts: Sequence[torch.Tensor], eps: float) -> tuple:
    """Dice(sigmoid(logits), gt) and BCEWithLogits, each the mean over samples of per-sample means."""
    dice, bce = [], []
    for lg, gt in zip(logits, gts):
        g = gt.to(lg.dtype)
        p = lg.sigmoid()
        dice.append(1 - (2 * (p * g).sum() + eps) / (p.sum() + g.sum() + eps))
        bce.append(F.binary_cross_entropy_with_logits(lg, g))
    return torch.stack(dice).mean(), torch.stack(bce).mean()


def glimpse_loss(out: GlimpseForward, gts: Sequence[torch.Tensor], cfg: LossConfig,
                 distill: Optional[tuple] = None, objects: Sequence[torch.Tensor] = (),
                 word_mask: Optional[torch.Tensor] = None) -> tuple:
    """Total loss and its detached parts (floats). distill = (student, teacher) answer logits [T, V] of
    the plain sequence, adapted and frozen base, for KL(teacher || student) (token mean). word_mask
    [B, L] (the batch's question words, before the glimpse is inserted) for the route term."""
    dice, bce = mask_losses(out.importance_logits, gts, cfg.dice_eps)
    total = cfg.loc_weight * (cfg.dice_weight * dice + cfg.bce_weight * bce)
    parts = {"dice": dice.item(), "bce": bce.item()}
    if out.lm_loss is not None:
        total = total + cfg.le_weight * out.lm_loss
        parts["lm"] = out.lm_loss.item()
    if cfg.attn_weight > 0:
        attn_dice = []
        for m, gt in zip(out.attention_maps, gts):
            p = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-6)
            g = gt.to(p.dtype)
            attn_dice.append(1 - (2 * (p * g).sum() + cfg.dice_eps) / (p.sum() + g.sum() + cfg.dice_eps))
        attn = torch.stack(attn_dice).mean()
        total = total + cfg.attn_weight * attn
        parts["attn"] = attn.item()
    if cfg.which_weight > 0:
        if not objects:
            raise ValueError("which_weight needs the scenes' object masks (synthetic rows)")
        terms = []
        for m, gt, obj in zip(out.attention_maps, gts, objects):
            rel, pool = gt.bool(), obj.bool() | gt.bool()
            if rel.any() and (pool & ~rel).any():
                terms.append(torch.logsumexp(m[pool], 0) - torch.logsumexp(m[rel], 0))
        if terms:
            which = torch.stack(terms).mean()
            total = total + cfg.which_weight * which
            parts["which"] = which.item()
    if cfg.route_weight > 0:
        if out.route_logits is None or word_mask is None:
            raise ValueError("route_weight needs training_forward(with_route=True) and the batch's word mask")
        # the words lie before the glimpse, so their slots are unchanged by its insertion
        words = F.pad(word_mask, (0, 1))
        route, share = attention_share_loss(out.route_logits[:, :cfg.route_heads].float(), out.route_keys, words)
        if not math.isnan(share):
            total = total + cfg.route_weight * route
            parts["route"] = route.item()
            parts["route_share"] = share
    if distill is not None:
        student, teacher = distill
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
        total = total + cfg.distill_weight * kl
        parts["kl"] = kl.item()
    parts["loss"] = total.item()
    return total, parts


def mask_counts(logits: Sequence[torch.Tensor], gts: Sequence[torch.Tensor], threshold: float = 0.5) -> dict:
    """Token-level confusion counts of (sigmoid > threshold) vs gt, summed over samples."""
    pred = torch.cat([lg.detach().sigmoid() > threshold for lg in logits])
    gt = torch.cat([g.bool() for g in gts]).to(pred.device)
    return {"tp": int((pred & gt).sum()), "fp": int((pred & ~gt).sum()), "fn": int((~pred & gt).sum()),
            "tokens": int(gt.numel()), "gt_on": int(gt.sum()), "pred_on": int(pred.sum())}


def mask_scores(counts: dict) -> dict:
    """precision, recall, IoU and the predicted / gt on-fractions from `mask_counts` (summed)."""
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    div = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"precision": div(tp, tp + fp), "recall": div(tp, tp + fn), "iou": div(tp, tp + fp + fn),
            "pred_ratio": div(counts["pred_on"], counts["tokens"]), "gt_ratio": div(counts["gt_on"], counts["tokens"])}


# ---- the training loop -------------------------------------------------------------------------
class GlimpseTrainer:
    """Owns the frozen base model, the trainable modules, optimizer and schedule. One `step()` = one update."""

    def __init__(self, model, processor, modules: GlimpseModules, cfg: TrainConfig, source, device: torch.device):
        self.cfg, self.source, self.device = cfg, source, device
        self.model = model.to(device).eval().requires_grad_(False)
        self.modules = modules.to(device=device, dtype=torch.float32).train()
        # LoRA wrappers (new parameters, trainable) on the frozen base; {} without cfg.lora
        self.lora = lora_lib.attach(self.model, cfg.lora, seed=cfg.seed) if cfg.lora else {}
        self.core = QwenGlimpseModel(self.model, self.modules)
        self.encoder = BatchEncoder(processor)
        self.total_steps = cfg.total_steps(source.size)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = cosine_with_warmup(self.optimizer, round(cfg.warmup_ratio * self.total_steps), self.total_steps)
        self.step_done = 0

    def parameters(self) -> list:
        return list(self.modules.parameters()) + lora_lib.parameters(self.lora)

    def distill_logits(self, batch: GlimpseBatch, embedded: tuple) -> Optional[tuple]:
        """(adapted, base) plain-sequence answer logits for the distillation term, or None."""
        if not self.lora or self.cfg.loss.distill_weight <= 0:
            return None
        lora_lib.set_enabled(self.lora, False)
        try:
            with torch.no_grad():
                teacher = plain_answer_logits(self.core, batch, embedded)
        finally:
            lora_lib.set_enabled(self.lora, True)
        return plain_answer_logits(self.core, batch, embedded), teacher

    def batch(self, micro: int) -> GlimpseBatch:
        first = micro * self.cfg.batch_size
        samples = [self.source.example(i) for i in row_indices(self.source.size, self.cfg.seed, first, self.cfg.batch_size)]
        return build_batch(self.encoder, samples).to(self.device)

    def step(self) -> dict:
        """One optimizer update over grad_accum micro-batches; returns summed parts and mask counts."""
        cfg = self.cfg
        sums: dict = {}
        for k in range(cfg.grad_accum):
            batch = self.batch(self.step_done * cfg.grad_accum + k)
            with autocast(self.device):
                embedded = embed_batch(self.core, batch)
                out = training_forward(self.core, batch, with_lm_loss=cfg.loss.le_weight > 0, embedded=embedded,
                                       with_route=cfg.loss.route_weight > 0)
                loss, parts = glimpse_loss(out, batch.box_masks, cfg.loss, self.distill_logits(batch, embedded), batch.object_masks,
                                           batch.word_mask)
            (loss / cfg.grad_accum).backward()
            for key, value in {**parts, **mask_counts(out.importance_logits, batch.box_masks)}.items():
                sums[key] = sums.get(key, 0) + value
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_done += 1
        sums.update(grad_norm=float(grad_norm), updates=1, micro_batches=cfg.grad_accum)
        return sums

    # checkpoint = official modules dir + optimizer/schedule/RNG state
    def save_checkpoint(self, directory: Path, base_config: dict) -> None:
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.modules.save(tmp, base_config=base_config)
        if self.lora:
            lora_lib.save(self.lora, self.cfg.lora, tmp)
        torch.save({"step": self.step_done, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                    "total_steps": self.total_steps}, tmp / STATE_NAME)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)

    def load_checkpoint(self, directory: Path) -> None:
        """Weights, optimizer, schedule and RNG from `save_checkpoint` (same TrainConfig expected)."""
        saved = GlimpseModules.from_directory(directory)
        self.modules.load_official_state(saved.official_state(), source=str(directory))
        if self.lora:
            lora_lib.load_state(self.lora, read_adapter(directory))
        state = torch.load(directory / STATE_NAME, map_location="cpu", weights_only=True)
        if state["total_steps"] != self.total_steps:
            raise ValueError(f"{directory}: checkpoint planned {state['total_steps']} steps, this run {self.total_steps}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step_done = state["step"]


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup to the peak lr, then cosine decay to 0 at total_steps (HF's schedule)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: torch.device):
    """bf16 autocast on GPU; fp32 (no autocast) on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def run_training(trainer: GlimpseTrainer, out_dir: Path, base_config: dict, resume: bool = False,
                 keep_checkpoint: bool = False) -> dict:
    """Train to the planned step count with logs/checkpoints; write the final modules to out_dir.
    The checkpoint (OUT/checkpoint) is removed after success unless keep_checkpoint."""
    cfg, ckpt = trainer.cfg, out_dir / CHECKPOINT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / LOG_NAME
    if resume and (ckpt / STATE_NAME).is_file():
        trainer.load_checkpoint(ckpt)
        log.info("resumed from %s at step %d", ckpt, trainer.step_done)
        if log_path.is_file():  # drop lines logged after the checkpoint (they are redone)
            kept = [x for x in log_path.read_text().splitlines() if json.loads(x)["step"] <= trainer.step_done]
            log_path.write_text("".join(x + "\n" for x in kept))
    else:
        log_path.unlink(missing_ok=True)
    window: dict = {}
    last_line: dict = {}
    t0 = time.perf_counter()
    while trainer.step_done < trainer.total_steps:
        for key, value in trainer.step().items():
            window[key] = window.get(key, 0) + value
        step = trainer.step_done
        if step % cfg.log_every == 0 or step == trainer.total_steps:
            last_line = log_line(window, step, trainer, time.perf_counter() - t0)
            with open(log_path, "a") as fh:
                fh.write(json.dumps(last_line) + "\n")
            log.info("step %d/%d loss %.4f dice %.4f bce %.4f lm %.4f P %.3f R %.3f IoU %.3f keep %.3f (gt %.3f)",
                     step, trainer.total_steps, last_line["loss"], last_line["dice"], last_line["bce"],
                     last_line.get("lm", float("nan")), last_line["precision"], last_line["recall"],
                     last_line["iou"], last_line["pred_ratio"], last_line["gt_ratio"])
            window = {}
        if step % cfg.checkpoint_every == 0 and step < trainer.total_steps:
            trainer.save_checkpoint(ckpt, base_config)
    trainer.modules.save(out_dir, base_config=base_config)
    if trainer.lora:
        lora_lib.save(trainer.lora, trainer.cfg.lora, out_dir, base_name=str(base_config.get("_name_or_path", "")))
    if not keep_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)
    return last_line


def log_line(window: dict, step: int, trainer: GlimpseTrainer, seconds: float) -> dict:
    """Means over the window's micro-batches (losses), updates (grad norm) and tokens (mask scores)."""
    line = {"step": step, "lr": trainer.scheduler.get_last_lr()[0], "seconds": round(seconds, 1)}
    for key in ("loss", "dice", "bce", "lm", "kl", "attn", "which", "route", "route_share"):
        if key in window:
            line[key] = window[key] / window["micro_batches"]
    line["grad_norm"] = window["grad_norm"] / window["updates"]
    line.update(mask_scores(window))
    return line


# ---- command line ------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workers.training.glimpse_trainer", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="base Qwen2.5-VL: local dir, URL or hub id (workers.modeling.loading.resolve_dir)")
    p.add_argument("--out", required=True, type=Path, help="output glimpse-modules dir (+ checkpoint/, train_log.jsonl)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", action="store_true", help="train on the synthetic world (workers.toyworld)")
    src.add_argument("--jsonl", type=Path, help="Visual-CoT style JSONL (question, answer, image, bboxs xyxy px)")
    p.add_argument("--image-root", type=Path, help="directory the JSONL image paths are relative to")
    world = p.add_argument_group("synthetic world")
    world.add_argument("--world-from-base", action="store_true",
                       help="the base model's own world (its world.json, seed --world-seed); the size/object flags are ignored")
    world.add_argument("--image-size", type=int, default=224)
    world.add_argument("--min-objects", type=int, default=1)
    world.add_argument("--max-objects", type=int, default=12)
    world.add_argument("--world-seed", type=int, default=0, help="world seed (keep it distinct from evaluation's)")
    world.add_argument("--train-rows", type=int, default=20000, help="synthetic rows 0..N-1 (one epoch)")
    gp = p.add_argument_group("glimpse modules (new model)")
    gp.add_argument("--selected-layers", type=lambda t: tuple(int(x) for x in t.split(",")),
                    help="comma list of LLM layers whose glimpse attention feeds the VIP (default: K = round(2/3 * layers) - 1)")
    gp.add_argument("--reduce-layer", type=int, help="default max(selected layers)")
    gp.add_argument("--fuse-size", type=int, default=256)
    gp.add_argument("--cond-size", type=int, default=512)
    gp.add_argument("--vip-heads", type=int, default=4)
    gp.add_argument("--le-dropout", type=float, default=0.1)
    opt = p.add_argument_group("optimisation")
    for name, kind, default in (("lr", float, 1e-4), ("weight-decay", float, 0.0), ("warmup-ratio", float, 0.1),
                                ("batch-size", int, 1), ("grad-accum", int, 8), ("steps", int, None),
                                ("epochs", float, 1.0), ("seed", int, 42), ("log-every", int, 10),
                                ("checkpoint-every", int, 100), ("loc-weight", float, 1.0),
                                ("le-weight", float, 1.0), ("dice-eps", float, 1.0)):
        opt.add_argument(f"--{name}", type=kind, default=default)
    opt.add_argument("--attn-weight", type=float, default=0.0,
                     help="Dice of the glimpse's own min-max normalised attention map against the boxes (training only)")
    opt.add_argument("--which-weight", type=float, default=0.0,
                     help="cross-entropy of the glimpse's attention onto the asked object among the scene's objects")
    opt.add_argument("--route-weight", type=float, default=0.0,
                     help="cross-entropy of the glimpse's layer-0 attention onto the question's shape/colour words")
    opt.add_argument("--route-heads", type=int, default=2, help="layer-0 heads 0..N-1 the route term reads")
    opt.add_argument("--distill-weight", type=float, default=0.0,
                     help="KL(base || adapted) on the answer tokens (with --lora-layers): keeps the base's answers")
    lo = p.add_argument_group("LoRA on the LLM (GlimpsePrune+ layout: the adapter is saved next to the modules and merged on load)")
    lo.add_argument("--lora-layers", type=lambda t: tuple(int(x) for x in t.split(",")), help="comma list of decoder layers")
    lo.add_argument("--lora-targets", type=lambda t: tuple(t.split(",")), default=("q_proj", "k_proj"))
    lo.add_argument("--lora-rank", type=int, default=8)
    lo.add_argument("--lora-alpha", type=float, default=16.0)
    opt.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if present")
    opt.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/checkpoint after success")
    run = p.add_argument_group("runtime")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    run.add_argument("--attn", default="auto", help="attention implementation (auto: FA2 on GPU if installed, else sdpa)")
    run.add_argument("--max-pixels", type=int, help="processor max_pixels (JSONL images)")
    run.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.jsonl is not None and args.image_root is None:
        p.error("--jsonl needs --image-root")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    from workers.modeling.loading import load_base, pick_attention, pick_device, pick_dtype, resolve_dir

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model, processor = load_base(resolve_dir(args.base), pick_dtype("auto", device), pick_attention(args.attn, device), device)
    if args.max_pixels:
        processor.image_processor.size = {**processor.image_processor.size, "longest_edge": args.max_pixels}
    if args.synthetic:
        world = WorldConfig(image_size=args.image_size, min_objects=args.min_objects,
                            max_objects=args.max_objects, seed=args.world_seed)
        if args.world_from_base:
            world = load_world(resolve_dir(args.base), seed=args.world_seed)
        source = SyntheticSource(world, args.train_rows)
    else:
        source = VisualCoTSource(args.jsonl, args.image_root)
    cfg = TrainConfig(
        lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, batch_size=args.batch_size,
        grad_accum=args.grad_accum, steps=args.steps, epochs=args.epochs, seed=args.seed, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        loss=LossConfig(loc_weight=args.loc_weight, le_weight=args.le_weight, dice_eps=args.dice_eps,
                        distill_weight=args.distill_weight, attn_weight=args.attn_weight, which_weight=args.which_weight,
                        route_weight=args.route_weight, route_heads=args.route_heads),
        lora=LoraConfig(args.lora_layers, args.lora_targets, args.lora_rank, args.lora_alpha) if args.lora_layers else None,
    )
    extra = {"reduce_layer": args.reduce_layer} if args.reduce_layer is not None else {}
    gp = new_glimpse_config(model, args.selected_layers, attn_fuse_size=args.fuse_size, visual_cond_size=args.cond_size,
                            attn_fuse_num_heads=args.vip_heads, le_dropout_prob=args.le_dropout, **extra)
    modules = GlimpseModules(gp)
    modules.reset_parameters(generator=torch.Generator().manual_seed(cfg.seed))
    torch.manual_seed(cfg.seed)
    trainer = GlimpseTrainer(model, processor, modules, cfg, source, device)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "train_config": asdict(cfg), "glimpse_config": gp.gp_fields(), "total_steps": trainer.total_steps,
                "trainable_parameters": sum(p.numel() for p in trainer.parameters()), "device": str(device),
                "torch": torch.__version__}
    (args.out / "train_args.json").write_text(json.dumps(manifest, indent=2))
    log.info("training %d glimpse parameters for %d steps on %s", manifest["trainable_parameters"], trainer.total_steps, device)
    final = run_training(trainer, args.out, model.config.to_dict(), resume=args.resume, keep_checkpoint=args.keep_checkpoint)
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
