"""The image half of the Qwen2.5-VL processor as a few tensor ops: rescale + normalise + patchify of
images the image stage already sized, bit-identical to the transformers image processor.

Why not ship the processor's output from the image stage: `pixel_values` are float32, 4 patches x
1176 values per visual token, about 18.8 KB per token against 2.4 KB of raw RGB: 8x the object-store
bytes of the raw frames the stage sends now. Instead the actor turns the raw uint8 frame into
`pixel_values` with one table lookup per value and one permutation, on the model's device (a GPU
does it in microseconds; on CPU it is ~10x cheaper than the processor's per-image NumPy path).

Exactness: the processor computes float32(float64(v) * rescale_factor), then (x - mean) / std in
float32, per channel; a [3, 256] float32 table built with the same NumPy operations gives the same
value for every possible byte v, so the lookup is exact, and the patch order is the processor's
(grid_h/merge, grid_w/merge, merge, merge, C, temporal, patch, patch). An image the processor would
resize (a side not a multiple of patch x merge, or outside its pixel bounds) is left to the processor.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


class PixelPrep:
    """Built from a Qwen2-VL image processor; `__call__(images, device)` -> (pixel_values, image_grid_thw)."""

    def __init__(self, image_processor):
        ip = image_processor
        flags = (getattr(ip, "do_rescale", True), getattr(ip, "do_normalize", True))
        if not all(flags):
            raise ValueError("PixelPrep needs an image processor that rescales and normalises")
        self.patch = int(ip.patch_size)
        self.temporal = int(ip.temporal_patch_size)
        self.merge = int(ip.merge_size)
        self.factor = self.patch * self.merge
        self.processor = ip  # its resize bounds are read at each call (the actor sets the job's after loading)
        levels = np.arange(256, dtype=np.uint8)[None, :].repeat(3, axis=0)  # [C, 256]
        rescaled = (levels.astype(np.float64) * float(ip.rescale_factor)).astype(np.float32)
        mean = np.array(ip.image_mean, dtype=np.float32)[:, None]
        std = np.array(ip.image_std, dtype=np.float32)[:, None]
        self.table = torch.from_numpy(((rescaled - mean) / std).astype(np.float32))  # [C, 256]
        self._tables: dict = {}

    def applies(self, image) -> bool:
        """True if the processor would not resize this image (the image stage already sized it)."""
        w, h = image.size
        if h % self.factor or w % self.factor:
            return False
        size = getattr(self.processor, "size", None) or {}
        lo = size.get("shortest_edge") or getattr(self.processor, "min_pixels", None)
        hi = size.get("longest_edge") or getattr(self.processor, "max_pixels", None)
        return (lo is None or h * w >= lo) and (hi is None or h * w <= hi)

    def tokens(self, image) -> int:
        w, h = image.size
        return (h // self.patch) * (w // self.patch) // self.merge**2

    def __call__(self, images: Sequence, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device("cpu") if device is None else torch.device(device)
        grids = [[1, im.size[1] // self.patch, im.size[0] // self.patch] for im in images]
        if device.type == "cpu":
            values = torch.from_numpy(np.concatenate([self._cpu(im) for im in images]))
        else:
            values = torch.cat([self._device(im, device) for im in images])
        return values, torch.tensor(grids, dtype=torch.long, device=device)

    def _bytes_in_patch_order(self, frame):
        """[H, W, C] bytes -> [patches, C, p, p] in the processor's order (gh', gw', m, m); numpy or torch."""
        h, w, c = frame.shape
        m, p = self.merge, self.patch
        gh, gw = h // p, w // p
        x = frame.transpose(2, 0, 1) if isinstance(frame, np.ndarray) else frame.permute(2, 0, 1)
        x = x.reshape(c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6) if isinstance(x, np.ndarray) else x.permute(1, 4, 2, 5, 0, 3, 6)
        return x.reshape(gh * gw, c, p, p)

    def _cpu(self, image) -> np.ndarray:
        """NumPy: permute the bytes, then one table lookup per channel into the (C, temporal, p, p) layout."""
        x = self._bytes_in_patch_order(np.asarray(image.convert("RGB"), dtype=np.uint8))
        n, c, p, _ = x.shape
        out = np.empty((n, c, self.temporal, p, p), dtype=np.float32)
        table = self.table.numpy()
        for ch in range(c):
            out[:, ch] = np.take(table[ch], x[:, ch])[:, None]  # every temporal copy of a still image is the same
        return out.reshape(n, -1)

    def _device(self, image, device) -> torch.Tensor:
        """On an accelerator: upload the bytes (1/4 of float32), permute and gather there."""
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self.table.to(device)
        frame = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).to(device)
        x = self._bytes_in_patch_order(frame)  # [n, C, p, p]
        n, c, p, _ = x.shape
        values = torch.stack([table[ch][x[:, ch].long()] for ch in range(c)], dim=1)  # [n, C, p, p]
        return values.unsqueeze(2).expand(n, c, self.temporal, p, p).reshape(n, -1)


def expand_image_tokens(text: str, image_token: str, counts: Sequence[int]) -> str:
    """Replace the k-th image placeholder of a templated prompt by counts[k] copies (what the processor does)."""
    parts = text.split(image_token)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"the prompt has {len(parts) - 1} image placeholder(s) for {len(counts)} image(s)")
    out = [parts[0]]
    for count, rest in zip(counts, parts[1:]):
        out.append(image_token * count)
        out.append(rest)
    return "".join(out)
