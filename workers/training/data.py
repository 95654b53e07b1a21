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
  lists each row's images, rows in order; a two-image row has two entries): `scene_questions` asks several questions about one scene, so the vision tower
  runs once per scene, not once per question.
- Word targets (`word_*`): at each question token that names a shape (or a colour), which colours
  (shapes) the scene's objects of that shape (colour) have, and how many there are. They let
  training supervise the language model's first hop (question word -> matching image tokens)
  directly instead of only through the answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch

from workers.toyworld import (
    COLOURS,
    SHAPES,
    Sample,
    WorldConfig,
    box_token_mask,
    dense_cell_labels,
    make_sample,
    more_questions,
    row_box_masks,
    row_images,
    row_scenes,
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
    image_index: torch.Tensor  # [sum of images per row]: each row's images (indices into the I), rows in order
    cell_shape: torch.Tensor  # [I * G], 0 = background, else 1 + index in SHAPES
    cell_colour: torch.Tensor  # [I * G], 0 = background, else 1 + index in COLOURS
    word_pos: torch.Tensor  # [K, 2] (row, position) of each shape or colour word of the questions
    word_kind: torch.Tensor  # [K] SHAPE_WORD or COLOUR_WORD
    word_multi: torch.Tensor  # [K, 8] float: colours of the objects of that shape (shapes of that colour)
    word_count: torch.Tensor  # [K] how many objects have that shape (colour), clamped to MAX_COUNT
    qtypes: tuple[str, ...]
    answers: tuple[str, ...]
    # [B, G] bool: each row's relevant boxes on its images' merged-token grids (`box_masks`: the order
    # of its image tokens); rows with fewer visual tokens are padded with False. Empty for "no object" rows.
    box_cells: torch.Tensor | None = None
    # [B, G] long: per visual token of each row, 1 + the row-wide index of an object the question is NOT
    # about whose box covers it (`distractor_ids`), else 0; padded with 0 like `box_cells`.
    distractor_cells: torch.Tensor | None = None

    def to(self, device) -> "TrainBatch":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return TrainBatch(**moved)


def split_grids(grids: torch.Tensor, counts: Sequence[int], merge: int) -> list[list[tuple[int, int]]]:
    """Split `grids` (one (t, h, w) patch grid per image, the rows' images in order, as
    `image_grid_thw`) into each row's merged-token grids; row b has counts[b] images."""
    flat = [(gh // merge, gw // merge) for _, gh, gw in grids.tolist()]
    if sum(counts) != len(flat):
        raise ValueError(f"{len(counts)} rows hold {sum(counts)} images, {len(flat)} grids given")
    starts = np.cumsum([0, *counts]).tolist()
    return [flat[a:b] for a, b in zip(starts, starts[1:])]


def _row_grids(samples: Sequence[Sample], grids: torch.Tensor, merge: int) -> list[list[tuple[int, int]]]:
    return split_grids(grids, [len(row_images(s)) for s in samples], merge)


def box_masks(samples: Sequence[Sample], grids: torch.Tensor, merge: int) -> list[torch.Tensor]:
    """Per sample, its relevant boxes on the merged-token grids of its images (`grids`: one (t, h, w)
    patch grid per image, every row's images in order, as `image_grid_thw`): bool [N_v(b)], the order
    of the row's visual tokens (raster order per image, images in prompt order; the images a
    two-image row does not ask about are all False)."""
    return [torch.from_numpy(row_box_masks(s, g)) for s, g in zip(samples, _row_grids(samples, grids, merge))]


def distractor_ids(sample: Sample, grids: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per visual token of the row (its images' merged grids ``grids[i] = (grid_h, grid_w)``, tokens in
    the order of ``row_box_masks``), 1 + the index of an object the question is not about whose box covers
    it, the row's objects numbered over all its images in order (a later box over an earlier one), and 0
    on tokens of no such object. Every object of an image the question does not ask about counts.
    # [sum grid_h * grid_w] int64"""
    images = row_images(sample)
    if len(grids) != len(images):
        raise ValueError(f"row {sample.id} has {len(images)} images but {len(grids)} grids were given")
    relevant = {tuple(box) for box in sample.boxes}
    parts, number = [], 0
    for i, (objects, (gh, gw)) in enumerate(zip(row_scenes(sample), grids)):
        ids = np.zeros((gh, gw), np.int64)
        for obj in objects:
            number += 1
            if i == sample.target and tuple(obj["box"]) in relevant:
                continue
            ids[box_token_mask([obj["box"]], gh, gw)] = number
        parts.append(ids.reshape(-1))
    return np.concatenate(parts)


def object_masks(samples: Sequence[Sample], grids: torch.Tensor, merge: int) -> list[torch.Tensor]:
    """Per sample, the tokens of every object of every image of the row (bool [N_v(b)], as `box_masks`)."""
    return [torch.from_numpy(row_box_masks(s, g, every_object=True))
            for s, g in zip(samples, _row_grids(samples, grids, merge))]


def asked_image_masks(samples: Sequence[Sample], grids: torch.Tensor, merge: int) -> list[torch.Tensor]:
    """Per sample, True on the tokens of the image its question is about (all of them for one-image
    rows): bool [N_v(b)], as `box_masks`."""
    out = []
    for s, row in zip(samples, _row_grids(samples, grids, merge)):
        asked = s.target if s.images else 0
        out.append(torch.cat([torch.full((gh * gw,), k == asked, dtype=torch.bool) for k, (gh, gw) in enumerate(row)]))
    return out


def scene_questions(world: WorldConfig, index: int, count: int) -> list[Sample]:
    """`count` questions about scene `index` of `world` (`more_questions`: the first is
    `make_sample(world, index)` itself), all holding the same image object(s)."""
    return more_questions(world, make_sample(world, index), index, count)


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

    def prompt_ids(self, question: str, image_tokens) -> list[int]:
        """Token ids of the templated prompt for `question` after one image per entry of `image_tokens`
        (an int: one image), each image pad expanded to its token count."""
        counts = (image_tokens,) if isinstance(image_tokens, int) else tuple(image_tokens)
        key = (question, counts)
        if key not in self._prompts:
            content = [{"type": "image"}] * len(counts) + [{"type": "text", "text": question}]
            messages = [{"role": "user", "content": content}]
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids.count(self.image_token_id) != len(counts):
                raise ValueError(f"the chat template placed {ids.count(self.image_token_id)} image pads for {len(counts)} images")
            out, pads = [], iter(counts)
            for token in ids:
                out.extend([token] * next(pads) if token == self.image_token_id else [token])
            self._prompts[key] = out
        return self._prompts[key]

    def question_words(self, question: str, image_tokens) -> list[tuple[int, int, str]]:
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

    def image_tokens(self, grid: torch.Tensor, images: Sequence[int]) -> tuple[int, ...]:
        """The merged token count of each of `images` (indices into `grid`)."""
        return tuple(int(grid[j, 1] * grid[j, 2]) // self.merge**2 for j in images)

    def answer_rows(self, samples: Sequence[Sample], grid: torch.Tensor,
                    row_slots: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded [prompt, answer, <|im_end|>] rows: input_ids, attention_mask, labels [B, L]
        (labels = IGNORE_INDEX outside the answer). Row b shows images row_slots[b] of `grid`, in order."""
        rows, targets = [], []
        for sample, slots in zip(samples, row_slots):
            prompt = self.prompt_ids(sample.question, self.image_tokens(grid, slots))
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
        scenes: dict[int, tuple] = {}  # id(image) -> (slot, image, its objects); slot = index among the distinct images
        row_slots = []
        for s in samples:
            row_slots.append([scenes.setdefault(id(image), (len(scenes), image, objects))[0]
                              for image, objects in zip(row_images(s), row_scenes(s))])
        distinct = [(image, objects) for _, image, objects in scenes.values()]  # slot order
        pixel_values, grid = image_patches([image for image, _ in distinct], self.processor.image_processor)
        input_ids, attention_mask, labels = self.answer_rows(samples, grid, row_slots)
        shapes, colours = self._cells(distinct, grid)
        pads = (attention_mask == 0).sum(dim=1).tolist()
        words = self._word_targets(samples, grid, row_slots, pads)
        flat = [j for slots in row_slots for j in slots]
        grids = _row_grids(samples, grid[flat], self.merge)  # each row's merged-token grids
        return TrainBatch(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels,
            pixel_values=pixel_values, image_grid_thw=grid, image_index=torch.tensor(flat),
            cell_shape=shapes, cell_colour=colours, **words,
            qtypes=tuple(s.qtype for s in samples), answers=tuple(s.answer for s in samples),
            box_cells=torch.nn.utils.rnn.pad_sequence(
                [torch.from_numpy(row_box_masks(s, g)) for s, g in zip(samples, grids)], batch_first=True),
            distractor_cells=torch.nn.utils.rnn.pad_sequence(
                [torch.from_numpy(distractor_ids(s, g)) for s, g in zip(samples, grids)], batch_first=True),
        )

    def _word_targets(self, samples, grid, row_slots, pads) -> dict[str, torch.Tensor]:
        pos, kind, multi, count = [], [], [], []
        for row, (sample, slots, pad) in enumerate(zip(samples, row_slots, pads)):
            for index, word_kind, word in self.question_words(sample.question, self.image_tokens(grid, slots)):
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

    def _cells(self, scenes: Sequence[tuple], grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense labels of each distinct image ((image, objects) in slot order)."""
        shapes, colours = [], []
        for (image, objects), (_, gh, gw) in zip(scenes, grid.tolist()):
            shape, colour = dense_cell_labels(SimpleNamespace(image=image, objects=objects), gh // self.merge, gw // self.merge)
            shapes.append(shape.reshape(-1))
            colours.append(colour.reshape(-1))
        return torch.from_numpy(np.concatenate(shapes)), torch.from_numpy(np.concatenate(colours))


def attention_share_loss(logits: torch.Tensor, allowed: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """-log(softmax mass on `target`), the softmax over `allowed` keys; logits [B, h, L], masks [B, L].
    Rows without a target are skipped. Returns the mean loss and the mean share (a diagnostic)."""
    logp = torch.log_softmax(logits.masked_fill(~allowed.unsqueeze(1), float("-inf")), dim=-1)
    on = torch.logsumexp(logp.masked_fill(~target.unsqueeze(1), float("-inf")), dim=-1)  # [B, h]
    valid = target.any(dim=1)
    if not bool(valid.any()):
        return logits.new_zeros(()), float("nan")
    on = on[valid]
    return -on.mean(), float(on.detach().exp().mean())
