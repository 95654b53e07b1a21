"""Synthetic samples -> the model's training inputs, labels and dense per-cell targets.

Place in the project: `train_base` (and anything else that trains on the synthetic world) turns
`workers.toyworld.Sample`s into a `TrainBatch` here. The prompt is exactly what the engine
feeds the model at inference (`GlimpseEngine.build_inputs`): the chat template with the user
content = [image, question text], `add_generation_prompt=True`, the default system prompt from the
template, and left padding. The answer follows the prompt as plain tokens, then `<|im_end|>`.

Invariants:
- `labels` are IGNORE_INDEX everywhere except the answer tokens and the closing `<|im_end|>`
  (labels are aligned with `input_ids`; the loss shifts them by one).
- The prompt ids equal the processor's for the same text and image (the unit tests check it): the
  template is rendered by the processor, tokenised by its tokenizer, and the single
  `<|image_pad|>` is expanded to grid_h * grid_w / merge**2 copies as the processor does.
- `pixel_values` equal the image processor's output (to float rounding) for images that need no
  resize (sides multiples of patch * merge within [min_pixels, max_pixels], e.g. 224 px); other
  sizes go through the image processor itself. The fast path exists because the PIL processor
  costs ~11 ms per 224 px image on the project's CPUs, as much as drawing the sample.
- `cell_shape` / `cell_colour` are `workers.toyworld.dense_cell_labels` on the merged-token grid,
  flattened row-major, which is the order of the vision tower's merged output tokens.
- Rows whose samples hold the same image object share one entry of `pixel_values` (`image_index`
  maps row -> image): `scene_questions` asks several questions about one scene, so the vision tower
  runs once per scene, not once per question.
- Word targets (`word_*`): at each question token that names a shape (or a colour), which colours
  (shapes) the scene's objects of that shape (colour) have, and how many there are. They let
  training supervise the language model's first hop (question word -> matching image tokens)
  directly instead of only through the answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from workers.toyworld import (
    COLOURS,
    SHAPES,
    Sample,
    SceneObject,
    WorldConfig,
    ask_question,
    box_token_mask,
    dense_cell_labels,
    make_sample,
)

IGNORE_INDEX = -100
SHAPE_WORD, COLOUR_WORD = 0, 1  # word_kind values
MAX_COUNT = 12  # word_count classes are 0..MAX_COUNT
_WORDS = {**{c: (COLOUR_WORD, c) for c in COLOURS}, **{s: (SHAPE_WORD, s) for s in SHAPES},
          **{s + ("es" if s.endswith(("s", "x")) else "s"): (SHAPE_WORD, s) for s in SHAPES}}


@dataclass(frozen=True)
class TrainBatch:
    """One left-padded batch: B rows (questions) about I <= B images; L tokens, N patches per image,
    G merged cells per image."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], IGNORE_INDEX outside answer + <|im_end|>
    pixel_values: torch.Tensor  # [I * N, C * T * P * P]
    image_grid_thw: torch.Tensor  # [I, 3]
    image_index: torch.Tensor  # [B], the image of each row
    cell_shape: torch.Tensor  # [I * G], 0 = background, else 1 + index in SHAPES
    cell_colour: torch.Tensor  # [I * G], 0 = background, else 1 + index in COLOURS
    word_pos: torch.Tensor  # [K, 2] (row, position) of each shape or colour word of the questions
    word_kind: torch.Tensor  # [K] SHAPE_WORD or COLOUR_WORD
    word_multi: torch.Tensor  # [K, 8] float: colours of the objects of that shape (shapes of that colour)
    word_count: torch.Tensor  # [K] how many objects have that shape (colour), clamped to MAX_COUNT
    qtypes: tuple[str, ...]
    answers: tuple[str, ...]
    # [B, G] bool: each row's relevant boxes on its image's merged-token grid, raster order (the order
    # of its image tokens); rows of smaller images are padded with False. Empty for "no object" rows.
    box_cells: torch.Tensor | None = None

    def to(self, device) -> "TrainBatch":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return TrainBatch(**moved)


def box_masks(samples: Sequence[Sample], grids: torch.Tensor, merge: int) -> list[torch.Tensor]:
    """Per sample, its relevant boxes on the merged-token grid of its image (grids[b] = (t, h, w)
    patches): bool [h/merge * w/merge], raster order = the order of the image's tokens."""
    return [torch.from_numpy(box_token_mask(s.boxes, gh // merge, gw // merge)).flatten()
            for s, (_, gh, gw) in zip(samples, grids.tolist())]


def object_masks(samples: Sequence[Sample], grids: torch.Tensor, merge: int) -> list[torch.Tensor]:
    """Per sample, the tokens of every object of its scene (bool [N_v], raster order as `box_masks`)."""
    return [torch.from_numpy(box_token_mask([o["box"] for o in s.objects], gh // merge, gw // merge)).flatten()
            for s, (_, gh, gw) in zip(samples, grids.tolist())]


def scene_questions(world: WorldConfig, index: int, count: int) -> list[Sample]:
    """`count` questions about scene `index` of `world`, all holding the same image object.

    The first is `make_sample(world, index)` itself; question k >= 1 is drawn like the world draws
    its own (`ask_question`, same mix) from `default_rng([seed, index, 1 + k])`, a stream the world
    never uses, so the extra questions are as deterministic as the scene.
    """
    first = make_sample(world, index)
    objects = [SceneObject.from_dict(o) for o in first.objects]
    out = [first]
    for k in range(1, count):
        qa = ask_question(world, objects, np.random.default_rng([world.seed, index, 1 + k]))
        boxes = [first.objects[i]["box"] for i in qa.relevant]
        out.append(Sample(id=f"{first.id}-q{k}", image=first.image, question=qa.question, answer=qa.answer,
                          qtype=qa.qtype, boxes=boxes, objects=first.objects, num_objects=first.num_objects))
    return out


def image_patches(images: Sequence, image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened patches and grids of RGB images, as the Qwen2-VL image processor makes them.

    Returns pixel_values [sum N_i, C * T * P * P] and image_grid_thw [n_images, 3].
    """
    ip = image_processor
    patch, merge, temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    factor = patch * merge
    sizes = {image.size for image in images}
    width, height = next(iter(sizes))
    fits = (
        len(sizes) == 1 and width % factor == 0 and height % factor == 0
        and ip.size["shortest_edge"] <= width * height <= ip.size["longest_edge"]  # min / max pixels
    )
    if not fits:
        out = ip(images=list(images), return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]
    pixels = torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images]))  # [B, H, W, C]
    x = pixels.permute(0, 3, 1, 2).float() * ip.rescale_factor  # [B, C, H, W]
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    x = (x - mean) / std
    b, c = x.shape[:2]
    gh, gw = height // patch, width // patch
    x = x.view(b, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [B, gh/m, gw/m, m, m, C, P, P]
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)  # [..., C, T, P, P]
    pixel_values = x.reshape(b * gh * gw, c * temporal * patch * patch)
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long)
    return pixel_values, grid


class BatchEncoder:
    """Encodes synthetic samples for training and teacher-forced evaluation.

    Holds the processor and a cache of prompt ids per (question, image token count): the synthetic
    world asks a few hundred distinct questions, so templating and tokenising each once saves time.
    """

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.tokenizer.pad_token_id
        self.merge = processor.image_processor.merge_size
        self._prompts: dict[tuple[str, int], list[int]] = {}
        self._words: dict[tuple[str, int], list[tuple[int, int, str]]] = {}

    def prompt_ids(self, question: str, image_tokens: int) -> list[int]:
        """Token ids of the templated prompt for one image and `question`, image pad expanded."""
        key = (question, image_tokens)
        if key not in self._prompts:
            content = [{"type": "image"}, {"type": "text", "text": question}]
            messages = [{"role": "user", "content": content}]
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            at = ids.index(self.image_token_id)
            self._prompts[key] = ids[:at] + [self.image_token_id] * image_tokens + ids[at + 1:]
        return self._prompts[key]

    def question_words(self, question: str, image_tokens: int) -> list[tuple[int, int, str]]:
        """(index in the prompt ids, kind, canonical word) of each shape or colour word of the question."""
        key = (question, image_tokens)
        if key not in self._words:
            ids = self.prompt_ids(question, image_tokens)
            after_image = len(ids) - ids[::-1].index(self.image_token_id)
            found = []
            for index in range(after_image, len(ids)):
                word = self.tokenizer.decode([ids[index]]).strip().lower()
                if word in _WORDS:
                    found.append((index, *_WORDS[word]))
            self._words[key] = found
        return self._words[key]

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens followed by <|im_end|>, the targets of the language-model loss."""
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.end_id]

    def answer_rows(self, samples: Sequence[Sample], grid: torch.Tensor,
                    image_index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded [prompt, answer, <|im_end|>] rows: input_ids, attention_mask, labels [B, L]
        (labels = IGNORE_INDEX outside the answer). Row b asks about image image_index[b] of `grid`."""
        rows, targets = [], []
        for sample, j in zip(samples, image_index):
            _, gh, gw = grid[j].tolist()
            prompt = self.prompt_ids(sample.question, gh * gw // self.merge**2)
            answer = self.answer_ids(sample.answer)
            rows.append(prompt + answer)
            targets.append([IGNORE_INDEX] * len(prompt) + answer)
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, (row, target) in enumerate(zip(rows, targets)):  # left padding
            input_ids[i, length - len(row):] = torch.tensor(row)
            attention_mask[i, length - len(row):] = 1
            labels[i, length - len(row):] = torch.tensor(target)
        return input_ids, attention_mask, labels

    def encode(self, samples: Sequence[Sample]) -> TrainBatch:
        slot: dict[int, int] = {}  # id(image) -> index among the distinct images
        image_index = [slot.setdefault(id(s.image), len(slot)) for s in samples]
        firsts = list({id(s.image): s for s in samples}.values())  # one sample per image, in slot order
        pixel_values, grid = image_patches([s.image for s in firsts], self.processor.image_processor)
        input_ids, attention_mask, labels = self.answer_rows(samples, grid, image_index)
        shapes, colours = self._cells(firsts, grid)
        pads = (attention_mask == 0).sum(dim=1).tolist()
        words = self._word_targets(samples, grid, image_index, pads)
        return TrainBatch(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels,
            pixel_values=pixel_values, image_grid_thw=grid, image_index=torch.tensor(image_index),
            cell_shape=shapes, cell_colour=colours, **words,
            qtypes=tuple(s.qtype for s in samples), answers=tuple(s.answer for s in samples),
            box_cells=torch.nn.utils.rnn.pad_sequence(box_masks(samples, grid[image_index], self.merge), batch_first=True),
        )

    def _word_targets(self, samples, grid, image_index, pads) -> dict[str, torch.Tensor]:
        pos, kind, multi, count = [], [], [], []
        for row, (sample, j, pad) in enumerate(zip(samples, image_index, pads)):
            _, gh, gw = grid[j].tolist()
            for index, word_kind, word in self.question_words(sample.question, gh * gw // self.merge**2):
                if word_kind == SHAPE_WORD:
                    hits = [o["colour"] for o in sample.objects if o["shape"] == word]
                    vocabulary = COLOURS
                else:
                    hits = [o["shape"] for o in sample.objects if o["colour"] == word]
                    vocabulary = SHAPES
                pos.append((row, pad + index))
                kind.append(word_kind)
                multi.append([float(v in hits) for v in vocabulary])
                count.append(min(len(hits), MAX_COUNT))
        return {
            "word_pos": torch.tensor(pos, dtype=torch.long).view(-1, 2),
            "word_kind": torch.tensor(kind, dtype=torch.long),
            "word_multi": torch.tensor(multi, dtype=torch.float32).view(-1, len(COLOURS)),
            "word_count": torch.tensor(count, dtype=torch.long),
        }

    def _cells(self, samples: Sequence[Sample], grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shapes, colours = [], []
        for sample, (_, gh, gw) in zip(samples, grid.tolist()):
            shape, colour = dense_cell_labels(sample, gh // self.merge, gw // self.merge)
            shapes.append(shape.reshape(-1))
            colours.append(colour.reshape(-1))
        return torch.from_numpy(np.concatenate(shapes)), torch.from_numpy(np.concatenate(colours))
