"""Train the small Qwen2.5-VL base model from scratch on the synthetic VQA world, on CPU.

    python -m workers.training.train_base --out models/small-qwen2_5_vl            # ~1 h, 2 CPU cores
    python -m workers.training.train_base --out DIR --resume                         # after a stop

Place in the project: this writes the shipped `models/small-qwen2_5_vl` directory, the base model
that the engine, the demo and GlimpsePrune training load like a hub checkpoint (stock
`Qwen2_5_VLForConditionalGeneration`, our tokenizer and image-only processor from
`workers.modeling.tiny`). Nothing here is needed at inference.

The recipe, and why (two phases, one optimizer, one cosine schedule per phase):
- Phase 1, vision warm-up (`vision_warmup_steps`): only the vision tower learns, from dense
  auxiliary supervision. A one-word answer is too weak a signal to teach a from-scratch vision tower
  shapes (a plain run plateaued at 42-46%: colours learnt, shapes at chance). Two linear heads
  (`AuxHeads`) read the vision tower's merged tokens, the very vectors the language model sees, and
  learn the generator's layout (`workers.toyworld.dense_cell_labels`: shape and colour of the
  object under each 28 px cell centre): shape cross-entropy on object cells only (background is ~90%
  of cells and would swamp it), colour cross-entropy on all cells (background = objectness), and an
  MSE pulling each merged token towards a fixed random code of its cell's (shape, colour), so that
  all background tokens look alike and object tokens stand out (see `cell_losses` for the evidence).
  The heads and codes are training-only and are not saved with the model.
- Phase 2, language model: the vision tower is frozen (`freeze_vision`; it runs without gradients,
  which also makes a step ~40% cheaper) and each scene is asked `questions_per_image` questions, so
  one vision pass feeds several answer losses. The loss covers only the answer tokens and
  `<|im_end|>`, each row weighted equally (a long caption would otherwise outweigh one-word answers).
  Word targets supervise the first hop directly: at each shape (colour) word of a question, linear
  heads on decoder layer `word_layer` predict the colours (shapes) of the scene's objects of that
  shape (colour) and their number (`data.BatchEncoder.question_words`).
- A mastery curriculum on the number of objects: phase 2 starts with one-object scenes, where no
  search is needed, and the object cap rises by one whenever the attribute + existence rows of the
  last `curriculum_window` steps were answered right `advance_accuracy` of the time; a linear floor
  reaches the world's 12 at `curriculum_end` of phase 2 whatever happens. Caps are fixed when a batch
  is submitted to the data workers, and saved, so a resumed run draws the same batches.
- Every training scene is fresh (scene `step * 32 + i` of the seeded world), and the held-out worlds
  use their own seeds (`HELDOUT_SEED + k`).

Evaluation: during training, teacher-forced exact match on a fixed held-out set (every answer token
and `<|im_end|>` must be the argmax; this equals "greedy decoding gives the answer", up to another
token sequence decoding to the same text). At the end, the saved directory is reloaded and asked
through `GlimpseEngine` (no pruning, greedy), exactly as users run it.

Checkpoints (`<checkpoint_dir>/last.pt`, written atomically every `checkpoint_every` steps): model,
heads, optimizer, step, RNG state, the accuracy curve and elapsed time. They are removed after a
successful export unless `--keep-checkpoints`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from workers.toyworld import (COLOURS, QTYPES, SHAPES, Sample, WorldConfig, generate_samples, row_images, save_world,
                              v2_world)
from workers.modeling.tiny import TinySpec, build_processor, build_tiny_model

from .data import IGNORE_INDEX, MAX_COUNT, SHAPE_WORD, BatchEncoder, TrainBatch, attention_share_loss, scene_questions

log = logging.getLogger(__name__)

MAX_OBJECTS = 12  # the synthetic world's default cap, the held-out scenes' distribution
HELDOUT_SEED = 1000  # held-out world of question type k uses seed HELDOUT_SEED + k
SUMMARY_FILE = "training_summary.json"
CHECKPOINT_FILE = "last.pt"

# The shipped model: 2.2M parameters, ~9 MB of fp32 weights. M-RoPE sections (4, 6, 6) sum to
# head_dim / 2 = 16. rope_theta 1e4 rather than the stock 1e6 so that the 8x8 grid positions of
# the visual tokens and the ~100 text positions rotate enough to be told apart by a small model.
PRESETS = {
    "small": TinySpec(
        vision_depth=4, vision_hidden_size=128, vision_num_heads=4, vision_intermediate_size=256,
        vision_fullatt_block_indexes=(1, 3), vision_window_size=112,
        text_num_layers=4, text_hidden_size=128, text_num_heads=4, text_num_kv_heads=2,
        text_intermediate_size=384, text_head_dim=32, mrope_section=(4, 6, 6), rope_theta=10_000.0,
    ),
    # Same, with 28 px patches and no 2x2 merge: one vision token per 28 px cell, 4x fewer vision tokens
    # (the vision tower is most of a step's cost at 14 px patches). Same 8x8 grid at 224 px.
    "small-p28": TinySpec(
        vision_depth=4, vision_hidden_size=128, vision_num_heads=4, vision_intermediate_size=256,
        vision_fullatt_block_indexes=(0, 1, 2, 3), vision_window_size=112, patch_size=28, spatial_merge_size=1,
        text_num_layers=4, text_hidden_size=128, text_num_heads=4, text_num_kv_heads=2,
        text_intermediate_size=384, text_head_dim=32, mrope_section=(4, 6, 6), rope_theta=10_000.0,
    ),
    # The second small model: the first one's vision tower (same sizes) and an 8-layer text decoder,
    # grown from the first one's 4 layers (`grow_weights`), pruned after layer 1.
    "small-v2": TinySpec(
        vision_depth=4, vision_hidden_size=128, vision_num_heads=4, vision_intermediate_size=256,
        vision_fullatt_block_indexes=(1, 3), vision_window_size=112,
        text_num_layers=8, text_hidden_size=128, text_num_heads=4, text_num_kv_heads=2,
        text_intermediate_size=384, text_head_dim=32, mrope_section=(4, 6, 6), rope_theta=10_000.0,
    ),
    "test": TinySpec(rope_theta=10_000.0),  # the 0.34M-parameter default, for unit tests
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. A step is one optimizer step on `batch_size` scenes with
    `questions_per_image` questions each; the first `vision_warmup_steps` train only the vision
    tower and the cell heads."""

    preset: str = "small"  # key of PRESETS
    steps: int = 2800  # both phases
    vision_warmup_steps: int = 800  # phase 1: vision tower + cell heads on the cell loss, no language model
    vision_batch_size: int = 32  # scenes per phase-1 step (full scenes, 1..12 objects)
    batch_size: int = 16  # scenes per phase-2 step ...
    questions_per_image: int = 4  # ... each asked this many questions: rows = batch_size * this
    freeze_vision: bool = True  # phase 2 trains the language model only (the vision tower runs no-grad)
    lr: float = 2e-3  # peak of each phase; linear warm-up, cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50  # per phase
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    cell_loss_weight: float = 1.0  # weight of (shape CE on object cells + colour CE on all cells)
    code_loss_weight: float = 1.0  # weight of the MSE of merged tokens to their cell's class code
    word_loss_weight: float = 1.0  # weight of the question-word targets (phase 2)
    word_layer: int = 2  # decoder layer whose output the word heads read (1-based; 2 of 4)
    start_max_objects: int = 1  # curriculum: object cap when the language model starts training
    advance_accuracy: float = 0.9  # raise the cap when attribute + existence rows reach this ...
    curriculum_window: int = 20  # ... exact-match accuracy over this many steps
    curriculum_end: float = 0.8  # the cap is at least a linear ramp reaching 12 at this share of phase 2
    question_mix: tuple[tuple[str, float], ...] = (
        ("attribute", 0.4), ("existence", 0.4), ("counting", 0.15), ("captioning", 0.05))
    image_size: int = 224  # px; 224 -> 8x8 = 64 visual tokens
    seed: int = 0  # training world seed and weight-init seed
    eval_every: int = 250
    eval_per_type: int = 100  # held-out samples per question type, teacher-forced, during training
    final_eval_per_type: int = 400  # held-out samples per question type through the engine at the end
    checkpoint_every: int = 100
    log_every: int = 10
    data_workers: int = 1  # processes drawing and encoding batches ahead (0 = in the main one)
    threads: int = 2  # torch intra-op threads
    device: str = "cpu"  # "cuda" for quick recipe checks; the shipped model is trained on CPU
    attn_loss_weight: float = 0.0  # lookup supervision at the answer slot (see `lookup_losses`); 0 = off
    attn_layer: int = 2  # 0-based decoder layer whose attention is supervised (the glimpse's layer K)
    attn_heads: int = 2  # heads 0..attn_heads-1 of that layer are supervised
    route_loss_weight: float = 0.0  # the slot's first hop onto the question's words (see `route_losses`); 0 = off
    route_layer: int = 0  # 0-based decoder layer of that hop (before attn_layer); heads 0..attn_heads-1
    prune_rows: float = 0.0  # share of rows trained with visual tokens pruned at prune_layer (see `pruned_masks`)
    prune_layer: int = 2  # 0-based K: pruned tokens leave after layer K, as in the engine
    prune_extra_max: float = 0.25  # besides the box tokens, keep a random U(0, this) share of the others
    # and keep each object the question is not about whole with a per-row probability U(0, this): a VIP
    # keeps other objects too, and rows kept to exactly the asked boxes teach "count what is left"
    prune_distractors: float = 0.0
    init_from: str = ""  # a saved model dir (e.g. the shipped one) to continue from: its weights replace the init
    world: str = "v1"  # "v1": the 224 px world of the first model; "v2": `workers.toyworld.v2_world` (336 px, region questions)
    grow_from: str = ""  # a saved model dir with fewer text layers: its layers become layers grow_offset.. (`grow_weights`)
    grow_offset: int = 2  # index of the first grown-into layer; the others start as identity (zero output projections)
    shield_layer: int = -1  # >= 0: penalise visual attention of text (and visual) queries in layers 0..this (`shield_losses`)
    shield_weight: float = 1.0
    two_image_share: float = 0.0  # share of training rows with two images, the question about one (world field)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset {self.preset!r} not in {sorted(PRESETS)}")
        if self.steps < 1 or self.batch_size < 1 or self.questions_per_image < 1 or self.lr <= 0:
            raise ValueError(f"need steps, batch_size, questions_per_image >= 1 and lr > 0; got "
                             f"{self.steps}, {self.batch_size}, {self.questions_per_image}, {self.lr}")
        if self.seed in range(HELDOUT_SEED, HELDOUT_SEED + len(QTYPES) + 1):
            raise ValueError(f"seed {self.seed} collides with the held-out seeds "
                             f"{HELDOUT_SEED}..{HELDOUT_SEED + len(QTYPES)}")
        if not 1 <= self.start_max_objects <= MAX_OBJECTS:
            raise ValueError(f"start_max_objects must be in 1..{MAX_OBJECTS}, got {self.start_max_objects}")
        if self.world not in ("v1", "v2") or (self.world == "v2" and self.image_size != 336):
            raise ValueError(f"world must be v1 or v2 (v2 needs image_size 336), got {self.world}, {self.image_size}")
        if not 0 <= self.vision_warmup_steps < self.steps:
            raise ValueError(f"vision_warmup_steps {self.vision_warmup_steps} must be in [0, steps {self.steps})")

    @property
    def spec(self) -> TinySpec:
        return PRESETS[self.preset]

    def make_world(self, seed: int, max_objects: int = MAX_OBJECTS,
                   question_mix: tuple[tuple[str, float], ...] | None = None) -> WorldConfig:
        """The training world (v1 or v2) with this seed, object cap and mix (default: the run's)."""
        mix = question_mix or self.question_mix
        if self.world == "v2":
            return dataclasses.replace(v2_world(seed, max_objects), question_mix=mix, two_image_share=self.two_image_share)
        return WorldConfig(image_size=self.image_size, max_objects=max_objects, question_mix=mix, seed=seed,
                           two_image_share=self.two_image_share)

    def processor_pixels(self) -> dict:
        """Processor bounds: v2 pins min = max = the training size, so every image is seen at it."""
        pixels = self.image_size**2
        return {"min_pixels": pixels, "max_pixels": pixels} if self.world == "v2" else {"max_pixels": pixels}


# ---------------------------------------------------------------------------------------------
# Data and curriculum


def scheduled_floor(cfg: TrainConfig, step: int) -> int:
    """The lowest object cap at `step`: a linear ramp from start_max_objects (end of the vision
    warm-up) to 12 (at curriculum_end * steps), so a slow learner still meets full scenes."""
    begin = cfg.vision_warmup_steps
    end = max(begin + cfg.curriculum_end * (cfg.steps - begin), begin + 1)
    frac = min(max((step - begin) / (end - begin), 0.0), 1.0)
    return int(cfg.start_max_objects + frac * (MAX_OBJECTS - cfg.start_max_objects))


def training_samples(cfg: TrainConfig, step: int, max_objects: int) -> list[Sample]:
    """The batch of `step` (scenes step * batch_size + i, `questions_per_image` questions each) with
    at most `max_objects` objects: a pure function of its arguments, which makes resuming exact."""
    world = cfg.make_world(cfg.seed, max_objects)
    vision_phase = step < cfg.vision_warmup_steps
    scenes = cfg.vision_batch_size if vision_phase else cfg.batch_size
    questions = 1 if vision_phase else cfg.questions_per_image
    first = step * max(cfg.vision_batch_size, cfg.batch_size)  # no scene is drawn twice
    return [q for i in range(first, first + scenes) for q in scene_questions(world, i, questions)]


def heldout_samples(image_size: int, per_type: int, world: WorldConfig | None = None) -> dict[str, list[Sample]]:
    """`per_type` samples of each question type from the default world (1..12 objects), or from `world`
    (its types only).

    Type k is drawn from its own world (seed HELDOUT_SEED + k, only that type in the mix, one image
    per row); a question that falls back to another type (no askable object) is skipped. A world with
    two-image rows adds "two_image": `per_type` rows with two images each, the world's mix (seed
    HELDOUT_SEED + len(QTYPES)).
    """
    out = {}
    trained = world
    base = dataclasses.replace(world or WorldConfig(image_size=image_size), two_image_share=0.0)
    qtypes = [q for q in QTYPES if world is None or q in dict(world.question_mix)]
    for k, qtype in enumerate(QTYPES):
        if qtype not in qtypes:
            continue
        world = dataclasses.replace(base, question_mix=((qtype, 1.0),), seed=HELDOUT_SEED + k)
        picked: list[Sample] = []
        index = 0
        while len(picked) < per_type:
            sample = next(generate_samples(world, 1, index))
            index += 1
            if sample.qtype == qtype:
                picked.append(sample)
        out[qtype] = picked
    if trained is not None and trained.two_image_share > 0:
        pairs = dataclasses.replace(trained, two_image_share=1.0, seed=HELDOUT_SEED + len(QTYPES))
        out["two_image"] = list(generate_samples(pairs, per_type))
    return out


# Set only inside feeder worker processes (by `_init_worker`): each builds its own encoder once.
_WORKER_ENCODER: BatchEncoder | None = None


def _init_worker(cfg: TrainConfig) -> None:
    global _WORKER_ENCODER
    torch.set_num_threads(1)
    _WORKER_ENCODER = BatchEncoder(build_processor(**cfg.processor_pixels(), spec=cfg.spec))


def _encode_in_worker(cfg: TrainConfig, step: int, max_objects: int) -> TrainBatch:
    return _WORKER_ENCODER.encode(training_samples(cfg, step, max_objects))


class BatchFeeder:
    """Draws and encodes the batches of the next steps in worker processes while the model trains.

    The object cap of a step's batch is fixed when it is submitted (`submit`), a few steps ahead of
    training; `planned` records those caps, so a resumed run re-submits exactly the same batches.
    """

    def __init__(self, cfg: TrainConfig, encoder: BatchEncoder):
        self.cfg, self.encoder = cfg, encoder
        self.futures: dict[int, Future] = {}
        self.pool = None
        if cfg.data_workers > 0:
            self.pool = ProcessPoolExecutor(cfg.data_workers, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_init_worker, initargs=(cfg,))

    @property
    def lookahead(self) -> int:
        return self.cfg.data_workers + 1

    def submit(self, step: int, max_objects: int) -> None:
        if self.pool is not None and step < self.cfg.steps:
            self.futures[step] = self.pool.submit(_encode_in_worker, self.cfg, step, max_objects)

    def take(self, step: int, max_objects: int) -> TrainBatch:
        future = self.futures.pop(step, None)
        if future is not None:
            return future.result()
        return self.encoder.encode(training_samples(self.cfg, step, max_objects))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Model, heads, losses


class AuxHeads(nn.Module):
    """Training-only linear heads (never saved with the model), all reading D = text hidden size.

    Cell heads, on the vision tower's merged tokens: `shape` and `colour` of each cell (class 0 =
    background). Word heads, on decoder layer `word_layer`'s output at each shape / colour word of a
    question: `colours_of` (the colours of the objects of that shape, multi-label), `shapes_of` (the
    shapes of the objects of that colour), `count` (how many, 0..MAX_COUNT).
    """

    def __init__(self, hidden_size: int, seed: int = 0):
        super().__init__()
        # Fixed class codes (not trained): a cell's merged token is pulled towards
        # shape_codes[shape] + colour_codes[colour], background included. See `cell_losses`.
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("shape_codes", torch.randn(len(SHAPES) + 1, hidden_size, generator=gen))
        self.register_buffer("colour_codes", torch.randn(len(COLOURS) + 1, hidden_size, generator=gen))
        self.shape = nn.Linear(hidden_size, len(SHAPES) + 1)
        self.colour = nn.Linear(hidden_size, len(COLOURS) + 1)
        self.colours_of = nn.Linear(hidden_size, len(COLOURS))
        self.shapes_of = nn.Linear(hidden_size, len(SHAPES))
        self.count = nn.Linear(hidden_size, MAX_COUNT + 1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shape(tokens), self.colour(tokens)  # [N, 9], [N, 9]


def build_heads(cfg: TrainConfig) -> AuxHeads:
    with torch.random.fork_rng(devices=[]):  # the heads' init depends on the seed only
        torch.manual_seed(cfg.seed)
        return AuxHeads(cfg.spec.text_hidden_size, seed=cfg.seed).to(cfg.device)


@dataclass
class StepOutput:
    loss: torch.Tensor  # the optimised total
    lm_loss: float  # nan when the language model did not run
    cell_loss: float
    shape_acc: float  # cell shape accuracy on object cells
    colour_acc: float  # cell colour accuracy on object cells
    correct: torch.Tensor | None  # [B] bool: every answer token (and <|im_end|>) is the argmax
    word_loss: float = float("nan")
    word_acc: float = float("nan")  # question words whose multi-label target is predicted exactly
    attn_mass: float = float("nan")  # supervised heads' attention share on the relevant boxes (lookup loss)
    shield_share: float = float("nan")  # visual attention share of shielded queries in layers 0..K (shield loss)
    route_share: float = float("nan")  # the slot's attention share on the question's words (route loss)


def cell_losses(heads: AuxHeads, tokens: torch.Tensor, batch: TrainBatch,
                code_loss_weight: float = 1.0) -> tuple[torch.Tensor, float, float]:
    """Shape CE over the object cells only (background cells would swamp it: ~90% of all cells),
    colour CE over all cells (its background class is the objectness signal), and the code MSE.

    Why the code MSE: with merged tokens that are merely linearly decodable, the language model
    stayed at its answer prior for hundreds of steps (background tokens vary with texture and
    position and drown the few object tokens), while with "oracle" tokens = fixed random code of the
    cell's (shape, colour), one vector for all background, it learnt to read one-object scenes in
    ~100 steps. Pulling the real tokens towards those codes gives the language model that geometry.
    """
    shape_logits, colour_logits = heads(tokens)  # [I * G, 9] each
    on_object = batch.cell_shape > 0
    codes = heads.shape_codes[batch.cell_shape] + heads.colour_codes[batch.cell_colour]  # [I * G, D]
    colour_loss = F.cross_entropy(colour_logits, batch.cell_colour) + code_loss_weight * F.mse_loss(tokens, codes)
    if not bool(on_object.any()):
        return colour_loss, float("nan"), float("nan")
    shape_logits, colour_logits = shape_logits[on_object], colour_logits[on_object]
    shapes, colours = batch.cell_shape[on_object], batch.cell_colour[on_object]
    loss = F.cross_entropy(shape_logits, shapes) + colour_loss
    shape_acc = float((shape_logits.argmax(-1) == shapes).float().mean())
    colour_acc = float((colour_logits.argmax(-1) == colours).float().mean())
    return loss, shape_acc, colour_acc


def word_losses(heads: AuxHeads, hidden: torch.Tensor, batch: TrainBatch) -> tuple[torch.Tensor, float]:
    """Multi-label BCE (colours of a shape / shapes of a colour) + count CE at the question words.

    hidden: [B, L, D], one decoder layer's output. Returns the loss and the exact-set accuracy.
    """
    if batch.word_kind.numel() == 0:
        return hidden.new_zeros(()), float("nan")
    h = hidden[batch.word_pos[:, 0], batch.word_pos[:, 1]]  # [K, D]
    is_shape = (batch.word_kind == SHAPE_WORD).unsqueeze(-1)  # [K, 1]
    logits = torch.where(is_shape, heads.colours_of(h), heads.shapes_of(h))  # [K, 8]
    loss = (F.binary_cross_entropy_with_logits(logits, batch.word_multi)
            + F.cross_entropy(heads.count(h), batch.word_count))
    exact = ((logits > 0).float() == batch.word_multi).all(dim=-1).float().mean()
    return loss, float(exact)


def box_positions(batch: TrainBatch, is_image: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the positions of each row's relevant-box tokens (`batch.box_cells` placed on its
    image tokens, which are in the same raster order)."""
    return token_values(batch.box_cells, is_image)


def token_values(cells: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
    """[B, L]: per-row visual-token values (`cells` [B, G], each row's first N_v(b) entries, raster
    order) placed on the row's image-token positions; zero (False) elsewhere."""
    out = torch.zeros(is_image.shape, dtype=cells.dtype, device=is_image.device)
    counts = is_image.sum(dim=1)
    cells = cells.to(is_image.device)
    out[is_image] = torch.cat([cells[i, :int(n)] for i, n in enumerate(counts)])
    return out


def pruned_masks(batch: TrainBatch, is_image: torch.Tensor, rows: torch.Tensor, extra_max: float,
                 generator: torch.Generator, distractors: float = 0.0) -> torch.Tensor:
    """[B, L] bool, True at the visual tokens to drop (only in `rows`, [B] bool).

    Kept: the row's box tokens plus a random U(0, extra_max) share of its other visual tokens, at least
    one token. GlimpsePrune+ (reference section 6.2, stage A) adapts the LLM to box-pruned inputs; the
    random extra tokens stand in for the VIP's imprecision, so the model also copes with extra context.
    With `distractors` > 0, each object the question is not about (`batch.distractor_cells`) is also kept
    whole with a per-row probability U(0, distractors): a real VIP keeps other objects (the v2 modules'
    mask precision is ~0.3), and a model that only ever saw the asked boxes survive answers a count with
    the number of objects left, whatever they are. At 0 the random draws are those of the plain rule.
    """
    box = box_positions(batch, is_image)
    others = token_values(batch.distractor_cells, is_image) if distractors > 0 else None
    drop = torch.zeros_like(is_image)
    for b in rows.nonzero()[:, 0].tolist():
        visual = is_image[b].nonzero()[:, 0]
        keep = box[b, visual].clone()
        share = float(torch.rand((), generator=generator)) * extra_max
        keep |= torch.rand(len(visual), generator=generator) < share
        if others is not None:
            ids = others[b, visual]
            count = int(ids.max())
            if count:
                chance = float(torch.rand((), generator=generator)) * distractors
                chosen = torch.rand(count, generator=generator) < chance  # object k is ids == k + 1
                keep |= (ids > 0) & chosen[(ids - 1).clamp(min=0)]
        if not bool(keep.any()):
            keep[int(torch.randint(len(visual), (), generator=generator))] = True
        drop[b, visual[~keep]] = True
    return drop


def run_pruned(model, embeds, pad_mask, positions, drop: torch.Tensor, answer_rows: torch.Tensor,
               prune_layer: int) -> tuple[torch.Tensor, list]:
    """The decoder stack as the engine runs it when the `drop` tokens are pruned at `prune_layer`.

    Prompt tokens see every token in layers 0..K and only the kept ones after; answer tokens (the
    engine's decode steps, `answer_rows` [B, L] bool) see only the kept ones in every layer, because the
    engine also removes pruned tokens from the KV cache of layers 0..K. Masking keys is exact here:
    nothing reads a dropped token's output in a layer where it is masked. Returns the final normed
    hidden states and each layer's input (like `output_hidden_states`, without the final state).
    """
    from workers.modeling import compat

    lm = model.model.language_model
    base = compat.attention_mask(pad_mask, embeds.shape[1], "sdpa", embeds.dtype)  # [B, 1, L, L] bool
    diagonal = torch.eye(embeds.shape[1], dtype=torch.bool, device=embeds.device)[None, None]
    low = base & ~(answer_rows[:, None, :, None] & drop[:, None, None, :]) | diagonal
    high = base & ~drop[:, None, None, :] | diagonal
    rope = lm.rotary_emb(embeds, positions)
    hidden, inputs = embeds, []
    for i, layer in enumerate(lm.layers):
        inputs.append(hidden)
        hidden = compat.run_decoder_layer(layer, hidden, low if i <= prune_layer else high, rope, None)
    return lm.norm(hidden), inputs


def slot_logits(model, hidden_in: torch.Tensor, positions: torch.Tensor, batch: TrainBatch, layer_idx: int,
                n_heads: int) -> torch.Tensor:
    """Raw attention logits [B, h, L] of the answer slot (the last prompt position: the one predicting
    the first answer token, where a glimpse is inserted at training time and appended at inference)
    at decoder layer `layer_idx`, heads 0..n_heads-1, over every position of the row (the stock
    projections and M-RoPE; masking is the caller's)."""
    from workers.modeling.qwen2_5_vl import _rotate_half

    lm = model.model.language_model
    layer = lm.layers[layer_idx]
    attn = layer.self_attn
    x = layer.input_layernorm(hidden_in)  # [B, L, D]
    cos, sin = lm.rotary_emb(x, positions)  # [B, L, hd] each
    rows = torch.arange(x.shape[0], device=x.device)
    slot = (batch.labels != IGNORE_INDEX).int().argmax(dim=1) - 1  # [B] last prompt position
    q = attn.q_proj(x[rows, slot]).view(x.shape[0], -1, attn.head_dim)[:, :n_heads]  # [B, h, hd]
    q = q * cos[rows, slot].unsqueeze(1) + _rotate_half(q) * sin[rows, slot].unsqueeze(1)
    k = attn.k_proj(x).view(x.shape[0], x.shape[1], -1, attn.head_dim).transpose(1, 2)  # [B, kvh, L, hd]
    k = k * cos.unsqueeze(1) + _rotate_half(k) * sin.unsqueeze(1)
    groups = attn.config.num_attention_heads // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)[:, :n_heads]  # [B, h, L, hd]
    return (q.unsqueeze(2) @ k.transpose(-1, -2)).squeeze(2) / attn.head_dim**0.5  # [B, h, L]


def lookup_losses(model, hidden_in: torch.Tensor, positions: torch.Tensor, batch: TrainBatch, layer_idx: int,
                  n_heads: int) -> tuple[torch.Tensor, float]:
    """Attention supervision at the answer slot: -log(attention share on the relevant boxes).

    The query is the answer slot (`slot_logits`) at decoder layer `layer_idx` (the glimpse's layer K),
    heads 0..n_heads-1; the softmax runs over the row's visual tokens only (so it ranks them, whatever
    share of the whole attention they get: it does not fight the shield), the target is the row's
    relevant boxes (`batch.box_cells`; rows without any are skipped).

    Why: the small model learnt to look objects up at the question's shape/colour words (a layer-0 head
    there puts ~0.8 of its visual attention on the asked object) and hardly at the answer slot
    (0.1-0.2 on a 0.09 box share). A glimpse token sits at the answer slot, and its attention at layer
    K is all the VIP learns the question from, so on this base the VIP could only find "objects", not
    the asked one. Supervising the answer slot's lookup gives the glimpse a question-conditioned
    attention pattern to build on, as a large pretrained LLM has by itself.

    Returns the mean loss and the mean share (a diagnostic).
    """
    logits = slot_logits(model, hidden_in, positions, batch, layer_idx, n_heads)
    is_image = batch.input_ids == model.config.image_token_id  # [B, L]
    return attention_share_loss(logits, is_image, box_positions(batch, is_image))


def route_losses(model, hidden_in: torch.Tensor, positions: torch.Tensor, batch: TrainBatch, layer_idx: int,
                 n_heads: int) -> tuple[torch.Tensor, float]:
    """The first hop of the answer slot's lookup: -log(attention share on the question's shape and
    colour words) at decoder layer `layer_idx` (before the lookup layer), heads 0..n_heads-1, the
    softmax over every real position before the slot (rows without such a word are skipped).

    Why: with the lookup loss alone the slot's lookup stayed at chance (which AUC 0.53 after 300
    steps). A bilinear scorer fitted on the frozen base's layer-1 inputs ranks the asked object from
    the question word's state (held-out which AUC 0.73) but not from the slot's (0.52): the slot never
    read the word, so nothing at layer 1 could tell it which object to look up. Text reading text is
    no shortcut: the shield still keeps the image out of the text before the pruning layer.
    """
    logits = slot_logits(model, hidden_in, positions, batch, layer_idx, n_heads)
    real = batch.attention_mask.bool()
    slot = (batch.labels != IGNORE_INDEX).int().argmax(dim=1) - 1  # [B]
    before = torch.arange(real.shape[1], device=real.device)[None] <= slot[:, None]
    words = torch.zeros_like(real)
    words[batch.word_pos[:, 0], batch.word_pos[:, 1]] = True
    return attention_share_loss(logits, real & before, words & before)


def shield_losses(model, layer_inputs: Sequence[torch.Tensor], positions: torch.Tensor, batch: TrainBatch,
                  last_layer: int) -> tuple[torch.Tensor, float]:
    """No text-side shortcut before the pruning layer: -log(1 - visual attention share), in layers 0..K.

    Queries: the prompt's text tokens after the first image (the question, the answer slot) and the
    visual tokens; keys they must not read: every visual token (a visual query's own position
    excepted). The shares come from the stock attention of each layer (its own projections and
    M-RoPE, causal and padding masks), so what is trained is what the engine runs.

    Why: the engine prunes visual tokens after layer K = `last_layer`, but in layers 0..K the prompt
    sees all of them. The first small model (lookup supervision at K) learnt to copy the answer into
    the question's tokens there, so keeping exactly the wrong tokens changed ~1% of its answers. With
    these shares near 0, what the answer knows about the image must come through the tokens kept after
    K, and visual tokens cannot gather their neighbours' content before K either.
    Returns the mean loss and the mean share (a diagnostic).
    """
    from workers.modeling.qwen2_5_vl import _rotate_half

    lm = model.model.language_model
    is_image = batch.input_ids == model.config.image_token_id  # [B, L]
    real = batch.attention_mask.bool()
    text_q = real & ~is_image & (torch.cumsum(is_image.int(), dim=1) > 0) & (batch.labels == IGNORE_INDEX)
    queries = text_q | is_image  # [B, L]
    length = is_image.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=is_image.device).tril()
    allowed = causal[None] & real[:, None, :]  # [B, L(q), L(k)]
    own = torch.eye(length, dtype=torch.bool, device=is_image.device)[None]
    shielded = (is_image[:, None, :] & ~own).unsqueeze(1)  # [B, 1, Lq, Lk]
    losses, shares = [], []
    for i in range(last_layer + 1):
        layer = lm.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(layer_inputs[i])  # [B, L, D]
        cos, sin = lm.rotary_emb(x, positions)  # [B, L, hd]
        b = x.shape[0]
        q = attn.q_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)  # [B, h, L, hd]
        k = attn.k_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)  # [B, kvh, L, hd]
        q = q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)
        k = k * cos.unsqueeze(1) + _rotate_half(k) * sin.unsqueeze(1)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q @ k.transpose(-1, -2)) / attn.head_dim**0.5  # [B, h, Lq, Lk]
        probs = torch.softmax(logits.masked_fill(~allowed.unsqueeze(1), float("-inf")), dim=-1)
        share = (probs * shielded).sum(-1)  # [B, h, L]
        picked = share.transpose(1, 2)[queries]  # [Q, h]
        losses.append(-torch.log1p(-picked.clamp(max=1 - 1e-4)).mean())
        shares.append(float(picked.detach().mean()))
    return torch.stack(losses).mean(), sum(shares) / len(shares)


def grow_weights(model, directory: Path, offset: int) -> None:
    """Initialise `model` from a saved model with fewer text layers: its text layer i becomes layer
    i + offset, everything else (vision tower, embeddings, norm, head) is copied; the remaining layers
    start as identity maps (zero attention-output and MLP-down projections: the residual passes
    through), so the grown model first computes exactly what the saved one did."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(directory), dtype=torch.float32).state_dict()
    own = model.state_dict()
    prefix = "model.language_model.layers."
    mapped = {}
    for key, value in saved.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            key = f"{prefix}{int(index) + offset}.{rest}"
        if key not in own or own[key].shape != value.shape:
            raise ValueError(f"cannot grow from {directory}: {key} {tuple(value.shape)} has no place in this model")
        mapped[key] = value
    for key in own.keys() - mapped.keys():
        if not key.startswith(prefix):
            raise ValueError(f"cannot grow from {directory}: it has no {key}")
        if key.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            mapped[key] = torch.zeros_like(own[key])
    model.load_state_dict({**own, **mapped}, strict=True)


def answer_losses(model, per_image: Sequence[torch.Tensor], batch: TrainBatch, heads: AuxHeads | None = None,
                  word_layer: int = 2, attn: tuple[int, int] | None = None,
                  prune: tuple[torch.Tensor, int] | None = None, shield_layer: int = -1,
                  route: tuple[int, int] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, tuple | None, tuple | None, tuple | None]:
    """The language model on prompt + answer, run as in the engine's prefill: token embeddings with
    the image tokens' rows replaced by the vision tower's merged tokens (each row gets its image's,
    `image_index`), stock M-RoPE positions from `get_rope_index`, the stock decoder stack.

    Returns the answer loss (mean over rows of the mean over each row's answer tokens), [B] bool
    "every answer token is the argmax", (with `heads`) the word loss and accuracy at decoder
    layer `word_layer`, (with `attn` = (layer, heads)) `lookup_losses`' (loss, share), the shield's, and
    (with `route` = (layer, heads)) `route_losses`', each else None.
    """
    inner = model.model
    is_image = batch.input_ids == model.config.image_token_id  # [B, L]
    row_tokens = torch.cat([per_image[j] for j in batch.image_index.tolist()], dim=0)  # [B * G, D]
    embeds = inner.get_input_embeddings()(batch.input_ids)  # [B, L, D]
    embeds = embeds.masked_scatter(is_image.unsqueeze(-1), row_tokens.to(embeds.dtype))
    positions, _ = inner.get_rope_index(
        batch.input_ids, mm_token_type_ids=is_image.int(), image_grid_thw=batch.image_grid_thw[batch.image_index],
        attention_mask=batch.attention_mask)  # [3, B, L]
    if prune is not None and bool(prune[0].any()):
        answer_rows = torch.cumsum((batch.labels != IGNORE_INDEX).int(), dim=1) > 0  # [B, L]
        hidden, layer_inputs = run_pruned(model, embeds, batch.attention_mask, positions, prune[0], answer_rows, prune[1])
    else:
        out = inner.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=positions,
                                   use_cache=False,
                                   output_hidden_states=heads is not None or attn is not None or route is not None
                                   or shield_layer >= 0)
        hidden, layer_inputs = out.last_hidden_state, out.hidden_states  # [B, L, D]; [l] = input of layer l
    word_loss, word_acc = hidden.new_zeros(()), float("nan")
    if heads is not None:
        word_loss, word_acc = word_losses(heads, layer_inputs[word_layer], batch)
    lookup = None
    if attn is not None:
        lookup = lookup_losses(model, layer_inputs[attn[0]], positions, batch, *attn)
    shield = shield_losses(model, layer_inputs, positions, batch, shield_layer) if shield_layer >= 0 else None
    routed = route_losses(model, layer_inputs[route[0]], positions, batch, *route) if route is not None else None
    targets = batch.labels[:, 1:]  # position t predicts token t + 1
    scored = targets != IGNORE_INDEX  # [B, L-1]
    logits = model.lm_head(hidden[:, :-1][scored])  # [T, V]
    wanted = targets[scored]  # [T]
    rows = scored.nonzero()[:, 0]  # [T]
    per_token = F.cross_entropy(logits, wanted, reduction="none")
    counts = scored.sum(dim=1).clamp(min=1)  # [B]
    zeros = per_token.new_zeros(len(counts))
    loss = (zeros.index_add(0, rows, per_token) / counts).mean()
    wrong = zeros.index_add(0, rows, (logits.argmax(-1) != wanted).float())
    return loss, wrong == 0, word_loss, word_acc, lookup, shield, routed


def forward_batch(model, heads: AuxHeads, batch: TrainBatch, cfg: TrainConfig,
                  with_lm: bool = True, train_vision: bool = True, generator: torch.Generator | None = None) -> StepOutput:
    """Vision tower -> cell heads (and, with_lm, the language model -> answer loss).

    train_vision=False runs the vision tower and heads without gradients (their loss is reported
    but not optimised).
    """
    with torch.set_grad_enabled(train_vision and torch.is_grad_enabled()):
        image_out = model.model.get_image_features(batch.pixel_values, batch.image_grid_thw, return_dict=True)
        per_image = image_out.pooler_output  # I x [G, D]
        cell_loss, shape_acc, colour_acc = cell_losses(heads, torch.cat(per_image, dim=0), batch, cfg.code_loss_weight)
    loss = cfg.cell_loss_weight * cell_loss if train_vision else 0.0
    if not with_lm:
        return StepOutput(loss, float("nan"), float(cell_loss.detach()), shape_acc, colour_acc, None)
    word_heads = heads if cfg.word_loss_weight > 0 else None
    lookup_at = (cfg.attn_layer, cfg.attn_heads) if cfg.attn_loss_weight > 0 else None
    prune = None
    if cfg.prune_rows > 0 and generator is not None:  # training only; evaluation never prunes
        is_image = batch.input_ids == model.config.image_token_id
        rows = torch.rand(len(batch.input_ids), generator=generator) < cfg.prune_rows
        drop = pruned_masks(batch, is_image.cpu(), rows, cfg.prune_extra_max, generator,
                            cfg.prune_distractors).to(is_image.device)
        prune = (drop, cfg.prune_layer)
    route_at = (cfg.route_layer, cfg.attn_heads) if cfg.route_loss_weight > 0 else None
    lm_loss, correct, word_loss, word_acc, lookup, shield, routed = answer_losses(
        model, per_image, batch, word_heads, cfg.word_layer, lookup_at, prune, cfg.shield_layer, route_at)
    attn_mass = shield_share = route_share = float("nan")
    if shield is not None:
        loss = loss + cfg.shield_weight * shield[0]
        shield_share = shield[1]
    if lookup is not None:
        loss = loss + cfg.attn_loss_weight * lookup[0]
        attn_mass = lookup[1]
    if routed is not None:
        loss = loss + cfg.route_loss_weight * routed[0]
        route_share = routed[1]
    return StepOutput(loss + lm_loss + cfg.word_loss_weight * word_loss, float(lm_loss.detach()),
                      float(cell_loss.detach()), shape_acc, colour_acc, correct.cpu(),
                      float(word_loss.detach()), word_acc, attn_mass, shield_share, route_share)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Each phase has its own warm-up and cosine decay (the language model starts in phase 2)."""
    begin, end = (0, cfg.vision_warmup_steps) if step < cfg.vision_warmup_steps else (cfg.vision_warmup_steps, cfg.steps)
    step, length = step - begin, end - begin
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(length - cfg.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def build_optimizer(model, heads: AuxHeads, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and embeddings."""
    decay, no_decay = [], []
    for name, param in list(model.named_parameters()) + list(heads.named_parameters()):
        (decay if param.ndim >= 2 and "embed_tokens" not in name else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def train_step(model, heads, optimizer, batch: TrainBatch, cfg: TrainConfig, step: int) -> StepOutput:
    """One optimizer step; the phase (vision warm-up or language model) follows from `step`."""
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    with_lm = step >= cfg.vision_warmup_steps
    train_vision = not (with_lm and cfg.freeze_vision)
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # pruning draws: resumable
    out = forward_batch(model, heads, batch, cfg, with_lm=with_lm, train_vision=train_vision, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(heads.parameters()), cfg.grad_clip)
    optimizer.step()
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def teacher_forced_accuracy(model, heads, encoder: BatchEncoder, heldout: dict[str, list[Sample]],
                            cfg: TrainConfig, batch_size: int = 50) -> dict[str, float]:
    """Exact-match accuracy by question type, with every answer token scored under teacher forcing."""
    model.eval()
    device = next(model.parameters()).device
    accuracy = {}
    for qtype, samples in heldout.items():
        correct = 0
        for start in range(0, len(samples), batch_size):
            batch = encoder.encode(samples[start:start + batch_size]).to(device)
            correct += int(forward_batch(model, heads, batch, cfg).correct.sum())
        accuracy[qtype] = correct / len(samples)
    return accuracy


def engine_accuracy(model_dir: str | Path, per_type: int, image_size: int = 224,
                    batch_size: int = 50, world: WorldConfig | None = None) -> dict[str, dict]:
    """Reload `model_dir` and ask the held-out questions through `GlimpseEngine` (greedy, no pruning).

    Returns {qtype: {"accuracy", "n", "wrong_examples"}}; an answer counts when the stripped text equals
    the generator's answer.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    from workers.modeling.api import GenerationRequest, SamplingParams
    from workers.modeling.engine import GlimpseEngine
    from workers.modeling.tiny import load_processor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), attn_implementation="sdpa")
    engine = GlimpseEngine(model.float().eval(), load_processor(model_dir))
    sampling = SamplingParams(max_new_tokens=64)
    results = {}
    for qtype, samples in heldout_samples(image_size, per_type, world).items():
        answers = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            requests = [GenerationRequest(images=row_images(s), prompt=s.question) for s in chunk]
            answers += [r.text.strip() for r in engine.generate(requests, sampling)]
        hits = [a == s.answer for a, s in zip(answers, samples)]
        wrong = [{"id": s.id, "question": s.question, "answer": s.answer, "got": a}
                 for a, s, hit in zip(answers, samples, hits) if not hit][:5]
        results[qtype] = {"accuracy": sum(hits) / len(hits), "n": len(hits), "wrong_examples": wrong}
    return results


# ---------------------------------------------------------------------------------------------
# Checkpoints and export


@dataclass
class RunState:
    """What survives a stop: the next step, the curriculum, the curve so far, the wall time spent."""

    step: int = 0  # the next step to run
    elapsed_s: float = 0.0
    cpu_s: float = 0.0  # CPU seconds of the training process (data workers not counted)
    max_objects: int = 1  # the mastery curriculum's object cap (the scheduled floor may be higher)
    planned: dict = field(default_factory=dict)  # step -> object cap of batches already submitted
    window_hits: int = 0  # attribute + existence rows answered right in the current window
    window_rows: int = 0
    curve: list = field(default_factory=list)
    cap_changes: list = field(default_factory=list)  # [step, cap] each time the mastery cap rises


# Fields a resumed run must share with its checkpoint: they decide the weights' shapes, the data drawn
# at each step and the phase boundary.
_RESUME_KEYS = ("preset", "seed", "image_size", "batch_size", "vision_batch_size", "questions_per_image",
                "vision_warmup_steps", "question_mix")


def save_checkpoint(path: Path, model, heads, optimizer, state: RunState, cfg: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(), "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
        "state": dataclasses.asdict(state), "config": dataclasses.asdict(cfg),
        "torch_rng": torch.get_rng_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a stop mid-write leaves the previous checkpoint


def load_checkpoint(path: Path, model, heads, optimizer, cfg: TrainConfig) -> RunState:
    payload = torch.load(path, map_location="cpu", weights_only=True)  # tensors, numbers, strings, lists, dicts
    saved, now = payload["config"], dataclasses.asdict(cfg)
    differ = {k: (saved.get(k), now[k]) for k in _RESUME_KEYS if saved.get(k) != now[k]}
    if differ:  # other fields (steps, eval and logging settings, workers) may change on resume
        raise ValueError(f"checkpoint {path} does not match this run; (saved, now): {differ}")
    model.load_state_dict(payload["model"])
    heads.load_state_dict(payload["heads"])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["torch_rng"])
    return RunState(**payload["state"])


def load_weights(model, directory: Path) -> None:
    """Copy a saved model directory's weights (same preset) into `model`; every tensor must match."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(directory), dtype=torch.float32)
    model.load_state_dict(saved.state_dict(), strict=True)


def export_model(model, processor, out: Path) -> None:
    """The model directory: config, fp32 safetensors, generation config, tokenizer, processor."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)


def dir_size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


# ---------------------------------------------------------------------------------------------
# The run


def _cap_for(cfg: TrainConfig, state: RunState, step: int) -> int:
    """Object cap of the batch of `step`: full scenes in the vision warm-up, else the curriculum's."""
    if step < cfg.vision_warmup_steps:
        return MAX_OBJECTS
    return max(state.max_objects, scheduled_floor(cfg, step))


def _update_curriculum(cfg: TrainConfig, state: RunState, batch: TrainBatch, out: StepOutput) -> None:
    """Mastery rule: raise the cap by one when the attribute + existence rows of the last
    `curriculum_window` steps were answered right at least `advance_accuracy` of the time."""
    keep = torch.tensor([q in ("attribute", "existence") for q in batch.qtypes])
    state.window_hits += int(out.correct[keep].sum())
    state.window_rows += int(keep.sum())
    if (state.step - cfg.vision_warmup_steps) % cfg.curriculum_window:
        return
    accuracy = state.window_hits / max(state.window_rows, 1)
    if accuracy >= cfg.advance_accuracy and state.max_objects < MAX_OBJECTS:
        state.max_objects += 1
        state.cap_changes.append([state.step, state.max_objects])
        log.info("curriculum: window accuracy %.3f >= %.2f, object cap -> %d", accuracy, cfg.advance_accuracy,
                 state.max_objects)
    state.window_hits = state.window_rows = 0


def _log_window(cfg: TrainConfig, state: RunState, lr: float, outs: Sequence[StepOutput], t0: float) -> None:
    def mean(values):  # ignoring nan (a batch without object cells, a warm-up step without answers)
        kept = [v for v in values if not math.isnan(v)]
        return sum(kept) / len(kept) if kept else float("nan")

    answered = [o for o in outs if o.correct is not None]
    train_acc = mean([float(o.correct.float().mean()) for o in answered]) if answered else float("nan")
    log.info("step %d/%d lr %.2e lm %.4f cell %.4f shape %.3f colour %.3f word %.4f word_acc %.3f "
             "box_attn %.3f route %.3f shield %.4f train_acc %.3f cap %d %.2fs/step",
             state.step, cfg.steps, lr, mean([o.lm_loss for o in outs]), mean([o.cell_loss for o in outs]),
             mean([o.shape_acc for o in outs]), mean([o.colour_acc for o in outs]),
             mean([o.word_loss for o in outs]), mean([o.word_acc for o in outs]),
             mean([o.attn_mass for o in outs]), mean([o.route_share for o in outs]), mean([o.shield_share for o in outs]),
             train_acc,
             _cap_for(cfg, state, state.step - 1), (time.perf_counter() - t0) / len(outs))


def _evaluate(cfg, state, model, heads, encoder, heldout, start_time) -> None:
    accuracy = teacher_forced_accuracy(model, heads, encoder, heldout, cfg)
    state.curve.append({"step": state.step, "wall_s": round(time.perf_counter() - start_time, 1),
                        "object_cap": _cap_for(cfg, state, state.step - 1), "accuracy": accuracy})
    log.info("held-out (teacher-forced, %d per type) at step %d: %s", cfg.eval_per_type, state.step,
             " ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))


def train(cfg: TrainConfig, out: Path, checkpoint_dir: Path, resume: bool = False,
          stop_at: int | None = None) -> RunState:
    """Train (or continue) to `cfg.steps`, export the model to `out`, return the final state.

    With `stop_at` < cfg.steps: stop after that step with a checkpoint and no export (a later run with
    --resume continues on the same schedule; a resume with a smaller `steps` changes the schedule from
    there on, which is how a run is cut short and still ends with a decayed learning rate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, out, checkpoint_dir, resume, stop_at)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, out: Path, checkpoint_dir: Path, resume: bool, stop_at: int | None = None) -> RunState:
    processor = build_processor(**cfg.processor_pixels(), spec=cfg.spec)
    encoder = BatchEncoder(processor)
    model = build_tiny_model(cfg.spec, seed=cfg.seed).to(cfg.device)
    if cfg.init_from and not (resume and (checkpoint_dir / CHECKPOINT_FILE).exists()):
        load_weights(model, Path(cfg.init_from))
        log.info("initialised the model from %s", cfg.init_from)
    if cfg.grow_from and not (resume and (checkpoint_dir / CHECKPOINT_FILE).exists()):
        grow_weights(model, Path(cfg.grow_from), cfg.grow_offset)
        log.info("grew the model from %s (its text layers -> %d..)", cfg.grow_from, cfg.grow_offset)
    heads = build_heads(cfg)
    optimizer = build_optimizer(model, heads, cfg)
    ckpt = checkpoint_dir / CHECKPOINT_FILE
    state = RunState(max_objects=cfg.start_max_objects)
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt, model, heads, optimizer, cfg)
        log.info("resumed from %s at step %d (%.0f s spent)", ckpt, state.step, state.elapsed_s)
    elif resume:
        log.info("no checkpoint at %s; starting from step 0", ckpt)
    heldout = heldout_samples(cfg.image_size, cfg.eval_per_type, cfg.make_world(0) if cfg.world == "v2" else None)
    start_time, window, window_t0 = time.perf_counter() - state.elapsed_s, [], time.perf_counter()
    cpu_start = time.process_time() - state.cpu_s
    feeder = BatchFeeder(cfg, encoder)
    try:
        for step in range(state.step, min(state.step + feeder.lookahead, cfg.steps)):
            feeder.submit(step, state.planned.setdefault(step, _cap_for(cfg, state, step)))
        last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        while state.step < last:
            step, lr = state.step, lr_at(cfg, state.step)
            batch = feeder.take(step, state.planned.pop(step))
            with_lm = step >= cfg.vision_warmup_steps
            window.append(train_step(model, heads, optimizer, batch.to(cfg.device), cfg, step))
            state.step += 1
            if with_lm:
                _update_curriculum(cfg, state, batch, window[-1])
            ahead = step + feeder.lookahead
            if ahead < cfg.steps:
                feeder.submit(ahead, state.planned.setdefault(ahead, _cap_for(cfg, state, ahead)))
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                _log_window(cfg, state, lr, window, window_t0)
                window, window_t0 = [], time.perf_counter()
            if with_lm and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
                _evaluate(cfg, state, model, heads, encoder, heldout, start_time)
            if state.step % cfg.checkpoint_every == 0 or state.step in (cfg.steps, last):
                state.elapsed_s = time.perf_counter() - start_time
                state.cpu_s = time.process_time() - cpu_start
                save_checkpoint(ckpt, model, heads, optimizer, state, cfg)
    finally:
        feeder.close()
    if state.step < cfg.steps:
        log.info("stopped at step %d of %d (--stop-at); resume with --resume", state.step, cfg.steps)
        return state
    state.elapsed_s = time.perf_counter() - start_time
    state.cpu_s = time.process_time() - cpu_start
    export_model(model.cpu(), processor, out)
    if cfg.world == "v2":
        save_world(cfg.make_world(cfg.seed), out)
    return state


def write_summary(out: Path, cfg: TrainConfig, state: RunState, engine_eval: dict | None) -> dict:
    from safetensors.torch import load_file

    weights = out / "model.safetensors"
    n_params = sum(t.numel() for t in load_file(str(weights)).values()) if weights.exists() else None
    summary = {
        "steps": state.step,
        "scenes_seen": state.step * cfg.batch_size,
        "questions_seen": state.step * cfg.batch_size * cfg.questions_per_image,
        "wall_time_s": round(state.elapsed_s, 1),
        "train_process_cpu_s": round(state.cpu_s, 1),
        "threads": cfg.threads,
        "config": dataclasses.asdict(cfg),
        "spec": dataclasses.asdict(cfg.spec),
        "parameters": n_params,
        "dir_size_bytes": dir_size_bytes(out),
        "heldout_seeds": {q: HELDOUT_SEED + k for k, q in enumerate(QTYPES)},
        "curve_teacher_forced": state.curve,
        "final_teacher_forced": state.curve[-1]["accuracy"] if state.curve else None,
        "curriculum_cap_changes": state.cap_changes,
        "engine_eval": engine_eval,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    try:
        mix = tuple((name.strip(), float(weight)) for name, weight in (part.split("=") for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected qtype=weight,...; got {text!r}") from None
    unknown = [name for name, _ in mix if name not in QTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown question types {unknown}; known: {list(QTYPES)}")
    return mix


def _parse_args(argv: Sequence[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m workers.training.train_base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="model directory to write")
    parser.add_argument("--resume", action="store_true", help="continue from <checkpoint-dir>/last.pt")
    parser.add_argument("--checkpoint-dir", type=Path, help="default: <out>/checkpoints")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--skip-engine-eval", action="store_true")
    parser.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint, no export")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "question_mix":
            parser.add_argument("--question-mix", type=_parse_mix, default=defaults.question_mix,
                                help="e.g. attribute=0.4,existence=0.4,counting=0.15,captioning=0.05")
            continue
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=default)
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**values), args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # `kill` (SIGTERM) unwinds like Ctrl-C, so the data workers are shut down; the last checkpoint stays.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    cfg, args = _parse_args(argv)
    checkpoint_dir = args.checkpoint_dir or args.out / "checkpoints"
    state = train(cfg, args.out, checkpoint_dir, resume=args.resume, stop_at=args.stop_at)
    if state.step < cfg.steps:
        return 0
    engine_eval = None
    if not args.skip_engine_eval and cfg.final_eval_per_type > 0:
        t0 = time.perf_counter()
        engine_eval = engine_accuracy(args.out, cfg.final_eval_per_type, cfg.image_size,
                                      world=cfg.make_world(0) if cfg.world == "v2" else None)
        log.info("engine eval (%d per type, %.0f s): %s", cfg.final_eval_per_type, time.perf_counter() - t0,
                 " ".join(f"{k} {v['accuracy']:.3f}" for k, v in engine_eval.items()))
    if not args.keep_checkpoints and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    summary = write_summary(args.out, cfg, state, engine_eval)
    log.info("wrote %s (%d bytes, %d steps, %.0f s)", args.out, summary["dir_size_bytes"], state.step, state.elapsed_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
