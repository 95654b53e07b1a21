"""The engine: `GlimpseEngine.generate(requests, sampling) -> results`, batched and stateless.

One call = one batch: requests are templated and processed together (left padding), prefilled in
one pass (GlimpsePrune or plain), then decoded together with per-row EOS stops. The caller (the
pipeline's actor) decides batch composition. Already-processed inputs are accepted by
`generate_from_inputs`, so other front ends and checks can feed the engine directly.

Explicit keep masks (per request `keep_mask`, or `KeepMasks` for processed inputs) replace the keep rule
and work with or without glimpse modules: same compaction, cache, re-padding and decode.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from torch import nn

from . import flops
from .api import GenerationRequest, GenerationResult, KeepMasks, SamplingParams
from .glimpse import GlimpseModules
from .keep_rule import KeepRule, split_per_image
from .pixels import PixelPrep, expand_image_tokens
from .qwen2_5_vl import GlimpsedRow, ModelInputs, PrefillState, QwenGlimpseModel
from .sampling import cut_at_stop, rows_sampling, select_next


class GlimpseEngine:
    """Holds a model, its processor, optional glimpse modules and the keep rule chosen at start."""

    def __init__(self, model: nn.Module, processor, modules: Optional[GlimpseModules] = None, rule: Optional[KeepRule] = None,
                 strategy=None):
        self.model = model.eval()
        self.processor = processor
        self.modules = modules.eval() if modules is not None else None
        if strategy is not None and (rule is None or rule.fixed_remain_ratio is None):
            raise ValueError(f"pruning strategy {strategy.name!r} needs a keep ratio: rule=KeepRule(fixed_remain_ratio=r)")
        self.rule = rule if rule is not None else (modules.config.keep_rule() if modules is not None else None)
        # A `strategies.Strategy` (FastV, DivPrune, ...) replaces the glimpse modules' pruning; None = GlimpsePrune.
        self.strategy = strategy
        self.core = QwenGlimpseModel(model, self.modules, strategy)
        self.device = next(model.parameters()).device
        self.eos_ids = _eos_ids(model, processor)
        tokenizer = getattr(processor, "tokenizer", processor)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        # Images the caller sized already skip the processor's image half (`pixels.PixelPrep`, exact).
        self.fast_pixels = True
        self._prep = None
        # Prompting: a system prompt for requests without their own, and a Jinja chat template replacing
        # the processor's (None: the model's own).
        self.system_prompt: Optional[str] = None
        self.chat_template: Optional[str] = None
        self._dims = None  # (flops.TextDims, flops.VisionDims) of the model, on first use

    @property
    def prunes(self) -> bool:
        return self.core.can_prune and self.rule is not None

    @property
    def pruning_name(self) -> str:
        """The pruning in force: "none", "glimpse" or the strategy's name."""
        if not self.prunes:
            return "none"
        return self.strategy.name if self.strategy is not None else "glimpse"

    def prune_layers(self) -> list:
        """The decoder layers after which this engine prunes (-1 = before the LLM); [] without pruning."""
        if not self.prunes:
            return []
        if self.strategy is not None:
            return self.strategy.stages(len(self.core.lm.layers))
        return [self.modules.config.reduce_layer]

    def prefill_work_ratio(self, prompt: int, visual: int, kept: int, masks: bool = False) -> float:
        """Predicted decoder prefill work pruned / unpruned for one row (schemas.rows: prefill_work_ratio):
        its token-layers with this engine's pruning schedule (a strategy's stages and their budgets, or
        GlimpsePrune's layer with its one glimpse token; masks: explicit keep masks at the modules'
        layer, no glimpse token) over all tokens at every layer."""
        layers = len(self.core.lm.layers)
        if not self.prunes:
            return 1.0
        if self.strategy is not None:
            return prefill_work_ratio(prompt, visual, self.strategy.stage_budgets(visual, kept, layers),
                                      layers, self.prune_layers(), extra=0)
        return prefill_work_ratio(prompt, visual, [kept], layers, self.prune_layers(), extra=0 if masks else 1)

    def prefill_flops(self, prompt: int, visual: int, kept: int, masks: bool = False) -> flops.PrefillFlops:
        """Predicted prefill FLOPs of one row with this engine's pruning and without it
        (`workers.modeling.flops`): the ViT, the decoder at each stage's length and, for GlimpsePrune,
        the glimpse pass and the VIP; explicit masks and other methods: their selection is not counted."""
        text, vision = self._flops_dims()
        layers = text.layers
        if not self.prunes:
            return flops.prefill_flops(text, prompt, visual, [], [], vision=vision)
        if self.strategy is not None:
            return flops.prefill_flops(text, prompt, visual, self.prune_layers(),
                                       self.strategy.stage_budgets(visual, kept, layers), vision=vision)
        if masks:
            return flops.prefill_flops(text, prompt, visual, self.prune_layers(), [kept], vision=vision)
        cfg = self.modules.config
        vip = flops.VipDims.from_glimpse_config(
            {"attn_fuse_size": cfg.attn_fuse_size, "visual_cond_size": cfg.visual_cond_size,
             "selected_visual_layers": cfg.selected_visual_layers, "selected_layers": cfg.selected_layers},
            vision_hidden=vision.hidden if vision is not None else 0, heads=text.heads)
        return flops.prefill_flops(text, prompt, visual, self.prune_layers(), [kept], vision=vision, vip=vip,
                                   glimpse_tokens=1, selected_layers=len(cfg.selected_layers))

    def _flops_dims(self) -> tuple:
        if self._dims is None:
            config = self.model.config
            text = getattr(config, "text_config", None) or config
            vision = getattr(config, "vision_config", None)
            self._dims = (flops.TextDims.from_config(text.to_dict()),
                          flops.VisionDims.from_config(vision.to_dict()) if vision is not None else None)
        return self._dims

    # ---- requests -> processed inputs -------------------------------------------------------
    def build_inputs(self, requests: Sequence[GenerationRequest]) -> ModelInputs:
        texts, images = [], []
        for req in requests:
            content = [{"type": "image"} for _ in req.images] + [{"type": "text", "text": req.prompt}]
            system = req.system or self.system_prompt
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
            texts.append(self.render_chat(messages))
            images.extend(req.images)
        self.processor.tokenizer.padding_side = "left"
        prep = self._pixel_prep()
        if images and prep is not None and all(prep.applies(im) for im in images):
            inputs = self._fast_inputs(prep, requests, texts, images)
        else:
            batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
            inputs = ModelInputs(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch.get("pixel_values"),
                image_grid_thw=batch.get("image_grid_thw"),
            )
        if any(r.visual_tokens is not None for r in requests):
            check_visual_tokens(requests, self.core.visual_tokens(inputs))
        return inputs

    def render_chat(self, messages: list) -> str:
        """The prompt text for one conversation, by the engine's chat template (or the model's)."""
        kwargs = {"chat_template": self.chat_template} if self.chat_template else {}
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        if not isinstance(text, str) or not text:
            raise ValueError("the chat template rendered no text")
        return text

    def check_chat_template(self) -> None:
        """Render one image question; a template that fails, or drops the image or the question, raises."""
        text = self.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}])
        token = getattr(self.processor, "image_token", None)
        if token and token not in text:
            raise ValueError(f"the chat template leaves out the image placeholder {token!r}")
        if "Q?" not in text:
            raise ValueError("the chat template leaves out the question text")

    def _pixel_prep(self):
        """The tensor-op image half (`pixels.PixelPrep`), or None when the processor is not a Qwen2-VL one
        or `fast_pixels` is off."""
        if not self.fast_pixels:
            return None
        if self._prep is None:
            ip = getattr(self.processor, "image_processor", None)
            if ip is None or not all(hasattr(ip, a) for a in ("patch_size", "temporal_patch_size", "merge_size", "image_mean")):
                self.fast_pixels = False
                return None
            self._prep = PixelPrep(ip)
        return self._prep

    def _fast_inputs(self, prep, requests, texts, images) -> ModelInputs:
        """Images already sized by the caller: pixel values by table lookup on the device, the prompt's
        image placeholders expanded as the processor does, then the tokenizer alone."""
        pixel_values, grid = prep(images, self.device)
        token = self.processor.image_token
        expanded, k = [], 0
        for req, text in zip(requests, texts):
            counts = [prep.tokens(im) for im in req.images]
            expanded.append(expand_image_tokens(text, token, counts))
            k += len(counts)
        batch = self.processor.tokenizer(expanded, padding=True, return_tensors="pt")
        return ModelInputs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=pixel_values, image_grid_thw=grid)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: SamplingParams = SamplingParams(),
        return_masks: bool = False,
        keep_layer: Optional[int] = None,
    ) -> list[GenerationResult]:
        """Answer the requests as one batch. If any request carries a `keep_mask`, every request with
        images must: the masks replace the keep rule, pruned after `keep_layer` (see `KeepMasks`)."""
        if not requests:
            return []
        keep = _request_keep_masks(requests, keep_layer)
        return self.generate_from_inputs(self.build_inputs(requests), sampling, return_masks=return_masks, keep=keep,
                                         limits=request_limits(requests, sampling), row_seeds=[r.seed for r in requests],
                                         rules=request_rules(requests), prune_seeds=request_prune_seeds(requests),
                                         row_params=[r.sampling for r in requests])

    # ---- processed inputs -> results ----------------------------------------------------------
    @torch.inference_mode()
    def generate_from_inputs(
        self,
        inputs: ModelInputs | dict,
        sampling: SamplingParams = SamplingParams(),
        prune: bool = True,
        return_masks: bool = False,
        keep: Optional[KeepMasks] = None,
        limits: Optional[Sequence[int]] = None,
        row_seeds: Sequence = (),
        rules: Optional[Sequence] = None,
        prune_seeds: Optional[Sequence] = None,
        row_params: Sequence = (),
    ) -> list[GenerationResult]:
        """prune=False: the plain model. keep: explicit per-row keep masks instead of the keep rule
        (with or without glimpse modules); prune must then be True. limits: per row, the most tokens
        it may generate (default: its sampling's max_new_tokens); the batch decodes until its last row
        stops. row_seeds: per row, its own sampling seed (or None). rules: per row, its own keep rule
        (or None: the engine's). prune_seeds: per row, the seed of a strategy's random choices.
        row_params: per row, its own SamplingParams (or None: the call's)."""
        if keep is not None and not prune:
            raise ValueError("explicit keep masks prune: pass prune=True (or no keep masks)")
        inputs = self._check(self._to_device(inputs))
        t0 = _now(self.device)
        if keep is not None:
            state = self.core.prefill(inputs, keep_masks=list(keep.masks), keep_layer=keep.keep_layer)
        else:
            state = self.core.prefill(inputs, self.rule if (prune and self.prunes) else None, rules=rules, seeds=prune_seeds)
        t1 = _now(self.device)
        rows = rows_sampling(sampling, state.logits.shape[0], self.device, row_seeds, row_params)
        tokens, finished = self._decode(state, rows, limits)
        t2 = _now(self.device)
        prompt_tokens = inputs.attention_mask.sum(dim=1).tolist()
        return [
            self._result(state, row, tokens[row], finished[row], prompt_tokens[row], (t1 - t0, t2 - t1), return_masks,
                         rows[row].params.stop)
            for row in range(len(tokens))
        ]

    @torch.inference_mode()
    def glimpse(self, inputs: ModelInputs | dict, keep: Optional[KeepMasks] = None, rules: Optional[Sequence] = None,
                prune_seeds: Optional[Sequence] = None) -> tuple[list[GlimpsedRow], float]:
        """The first half of a pruned prefill alone: per-sample rows and the stage's seconds. Without
        `keep` it is the glimpse stage (pruning engines only; `rules`: optional per-row keep rules);
        with it, the explicit-mask stage. With a pruning strategy it is that strategy's stage."""
        if keep is None and not self.prunes:
            raise ValueError("glimpse() needs glimpse modules (or a strategy) and a keep rule, or explicit keep masks")
        inputs = self._check(self._to_device(inputs))
        t0 = _now(self.device)
        if keep is not None:
            rows = self.core.masked_stage(inputs, list(keep.masks), keep.keep_layer)
        else:
            rows = self.core.prune_stage(inputs, self.rule, rules=rules, seeds=prune_seeds)
        return rows, _now(self.device) - t0

    @torch.inference_mode()
    def generate_from_rows(
        self, rows: Sequence[GlimpsedRow], sampling: SamplingParams = SamplingParams(), glimpse_s: Sequence[float] = (),
        return_masks: bool = False, limits: Optional[Sequence[int]] = None, row_seeds: Sequence = (), row_params: Sequence = (),
    ) -> list[GenerationResult]:
        """Finish the prefill of glimpsed rows (possibly from different glimpse batches) and decode.

        glimpse_s: per row, the seconds of the glimpse stage to add to its prefill time. limits,
        row_seeds, row_params: as in `generate_from_inputs`.
        """
        t0 = _now(self.device)
        state = self.core.finish_prefill(list(rows))
        t1 = _now(self.device)
        settings = rows_sampling(sampling, len(rows), self.device, row_seeds, row_params)
        tokens, finished = self._decode(state, settings, limits)
        t2 = _now(self.device)
        extra = list(glimpse_s) or [0.0] * len(rows)
        return [
            self._result(state, i, tokens[i], finished[i], rows[i].prompt_tokens, (t1 - t0 + extra[i], t2 - t1), return_masks,
                         settings[i].params.stop)
            for i in range(len(rows))
        ]

    def _check(self, inputs: ModelInputs) -> ModelInputs:
        if int(inputs.attention_mask[:, -1].min()) == 0:
            raise ValueError("inputs must be left-padded (attention_mask[:, -1] must be 1 for every row)")
        return inputs

    def _decode(self, state: PrefillState, rows: Sequence, limits: Optional[Sequence[int]] = None) -> tuple:
        """Static batch decode: every row until its EOS, a stop string or its limit; the batch runs until
        the last stops. rows: per row, its `sampling.RowSampling`."""
        bsz = state.logits.shape[0]
        eos = torch.tensor(self.eos_ids, device=self.device)
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        stopped = torch.zeros(bsz, dtype=torch.bool, device=self.device)  # by EOS or a stop string
        limit = torch.tensor(list(limits) if limits is not None else [r.params.max_new_tokens for r in rows], device=self.device)
        tokens: list = [[] for _ in range(bsz)]
        logits, pad = state.logits, state.pad_mask
        for step in range(int(limit.max())):
            nxt = select_next(logits, rows, tokens).masked_fill(done, self.pad_id)  # [B]
            for row in (~done).nonzero().flatten().tolist():
                tokens[row].append(int(nxt[row]))
            hit = torch.isin(nxt, eos) & ~done
            for row in (~done & ~hit).nonzero().flatten().tolist():
                if rows[row].params.stop and self.stop_reached(tokens[row], rows[row].params.stop):
                    hit[row] = True
            stopped |= hit
            done |= hit | (limit <= step + 1)
            if bool(done.all()):
                break
            pad = torch.cat([pad, pad.new_ones(bsz, 1)], dim=1)
            logits = self.core.decode_step(nxt, state.next_positions + step, pad, state.cache)
        return tokens, stopped.tolist()

    def stop_reached(self, token_ids: Sequence[int], stops: Sequence[str]) -> bool:
        """Whether the row's text so far holds one of its stop strings."""
        return cut_at_stop(self._text(token_ids), stops)[1]

    def _text(self, token_ids: Sequence[int]) -> str:
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        return tokenizer.decode([t for t in token_ids if t not in self.eos_ids], skip_special_tokens=True)

    def _result(self, state, row, token_ids, finished, prompt_tokens, times, return_masks, stops=()) -> GenerationResult:
        mask = state.keep_masks[row] if state.keep_masks is not None else None
        importance = state.importance_logits[row] if state.importance_logits else None
        return self.row_result(state.visual_tokens[row], mask, importance, token_ids, finished, prompt_tokens, times, return_masks,
                               stops)

    def row_result(self, per_image, mask, importance, token_ids, finished, prompt_tokens, times, return_masks,
                   stops=()) -> GenerationResult:
        """One row's result. per_image: its visual-token count per image; mask: its keep mask (None:
        unpruned); finished: it stopped at EOS or a stop string; times: (prefill_s, decode_s); stops:
        its stop strings (the text is cut before the first)."""
        visual = sum(per_image)
        kept_per_image = split_per_image(mask, per_image) if mask is not None else list(per_image)
        kept = sum(kept_per_image)
        text, _ = cut_at_stop(self._text(token_ids), stops)
        return GenerationResult(
            text=text,
            token_ids=token_ids,
            visual_tokens=visual,
            kept_tokens=kept,
            kept_per_image=kept_per_image,
            keep_ratio=kept / visual if visual else 1.0,
            prompt_tokens=int(prompt_tokens),
            output_tokens=len(token_ids),
            prefill_s=times[0],
            decode_s=times[1],
            finish_reason="stop" if finished else "length",
            importance_logits=importance.cpu() if (return_masks and importance is not None) else None,
            keep_mask=mask.cpu() if (return_masks and mask is not None) else None,
        )

    def _to_device(self, inputs) -> ModelInputs:
        if isinstance(inputs, dict):
            inputs = ModelInputs(**{k: inputs.get(k) for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")})
        return inputs.to(self.device)


def request_rules(requests: Sequence[GenerationRequest]) -> Optional[list]:
    """Per request, its own keep rule (None: the engine's); None when no request has one."""
    rules = [r.keep_rule for r in requests]
    return rules if any(r is not None for r in rules) else None


def request_prune_seeds(requests: Sequence[GenerationRequest]) -> Optional[list]:
    """Per request, the seed of a strategy's random choices; None when no request has one."""
    seeds = [r.prune_seed for r in requests]
    return seeds if any(s is not None for s in seeds) else None


def request_limits(requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[int]:
    """Per request, the most tokens it may generate (its own max_new_tokens, else its own sampling's or the call's)."""
    return [r.max_new_tokens or (r.sampling or sampling).max_new_tokens for r in requests]


def _request_keep_masks(requests: Sequence[GenerationRequest], keep_layer: Optional[int]) -> Optional[KeepMasks]:
    """The requests' keep masks as one `KeepMasks` (None when no request has one)."""
    if all(r.keep_mask is None for r in requests):
        if keep_layer is not None:
            raise ValueError("keep_layer is set but no request has a keep_mask")
        return None
    masks = []
    for i, req in enumerate(requests):
        if req.keep_mask is None and req.images:
            raise ValueError(f"request {i} has images but no keep_mask while others have one")
        masks.append(req.keep_mask if req.keep_mask is not None else ())
    return KeepMasks(tuple(masks), keep_layer)


def _eos_ids(model: nn.Module, processor) -> list[int]:
    ids = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.extend(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    tokenizer = getattr(processor, "tokenizer", processor)
    ids.append(getattr(tokenizer, "eos_token_id", None))
    ids = [int(i) for i in ids if i is not None]
    if not ids:
        raise ValueError("the model and tokenizer define no EOS token")
    return list(dict.fromkeys(ids))


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def check_visual_tokens(requests: Sequence[GenerationRequest], per_sample: list) -> None:
    """Raise ValueError if a request that states its visual-token count got another one from the
    processor (`per_sample`: per request, the token count of each of its images)."""
    for req, counts in zip(requests, per_sample):
        if req.visual_tokens is not None and sum(counts) != req.visual_tokens:
            sizes = ", ".join(f"{im.width}x{im.height}" for im in req.images)
            raise ValueError(f"the image processor made {sum(counts)} visual tokens of image(s) {sizes} that were sized to "
                             f"{req.visual_tokens}: its resize bounds differ from the job's image.min_pixels/max_pixels")


def prefill_work_ratio(prompt: int, visual: int, kept, layers: int, k, extra: int = 1) -> float:
    """Decoder prefill token-layers pruned / unpruned for one row.

    k: the pruning layer, or the layers of several stages (ascending, -1 = before the LLM); kept: the
    visual tokens left after it (or after each stage); extra: tokens added up to the first pruning
    layer (1: GlimpsePrune's glimpse). One stage gives ((K+1)(T+N+extra) + (L-K-1)(T+kept)) / (L(T+N))."""
    stages = [k] if isinstance(k, int) else list(k)
    kept = [kept] if isinstance(kept, int) else list(kept)
    text, work, start, width = prompt - visual, 0, 0, prompt + extra
    for layer, left in zip(stages, kept):
        work += (layer + 1 - start) * width
        start, width = layer + 1, text + left
    work += (layers - start) * width
    return work / (layers * prompt)
