"""GlimpsePrune on the stock transformers Qwen2.5-VL: the prefill loop and the decode step.

Reads top-down (reference section 4, "the single-forward-pass flow"):
  1. embed text, run the stock vision tower (hooks capture the selected blocks' outputs), scatter;
  2. stock M-RoPE positions (`get_rope_index`);
  3. append the glimpse (position = last + 1 on all axes), run layers 0..K adding e_l before each
     layer l >= 1, and at each selected layer take the glimpse's raw attention logits over the
     visual keys (q . k / sqrt(d), post-RoPE, all heads, GQA head h -> kv head h // groups);
  4. VIP -> importance logits -> keep rule per sample (jointly over its images);
  5. drop the glimpse and the pruned tokens from hidden states, KV cache of layers 0..K, pad mask
     and positions (survivors keep their original M-RoPE positions), re-left-pad;
  6. layers K+1..L-1 on the short sequence; LM head on the last position only.
Decoding continues on the pruned cache with explicit per-row positions (next = last + 1 + t).

Steps 1-5 are `glimpse_stage` (one `GlimpsedRow` per sample) and step 6 is `finish_prefill`, so a
caller may regroup rows from several glimpse batches by retained length before finishing them.

Explicit keep masks (`masked_stage`): the caller gives each row's keep mask over its visual tokens and
the layer after which they are dropped (-1 = from the LLM's input embeddings, before layer 0). Steps
1-2, then layers 0..that layer on the plain prompt (no glimpse, no VIP), then the same compaction
(step 5) and `finish_prefill`/decode as GlimpsePrune. With the glimpse modules' own keep masks at
their reduce_layer it equals GlimpsePrune: the glimpse is the last token, so causally no prompt token
ever sees it, and decoding never does.

`prune=False` (no glimpse modules) runs the plain model through the same code, for baselines.
Only the one glimpse row of attention is computed by hand; the real attention stays with the
configured backend (SDPA or flash-attention-2).

Deliberate differences from the reference code (numerically equivalent unless stated):
  * the glimpse query is projected from the layer's normed input for that one row only, and the
    keys are read back from the cache after the layer ran (cached keys are post-RoPE);
  * padded slots after compaction have position 0 (reference: 1) and zero hidden/K/V; they are
    masked, and a padded query may attend to itself only, so no value of theirs reaches a real row;
  * max(selected_layers) must be <= reduce_layer (true for every released checkpoint);
  * the model object holds no per-request state: everything lives in `PrefillState`.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import DynamicCache

from . import compat
from .glimpse import GlimpseModules
from .keep_rule import KeepRule, keep_masks


@dataclass(frozen=True)
class ModelInputs:
    """Processor output for a left-padded batch. input_ids/attention_mask: [B, L]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None  # [n_images, 3]

    def to(self, device) -> "ModelInputs":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ModelInputs(move(self.input_ids), move(self.attention_mask), move(self.pixel_values), move(self.image_grid_thw))


@dataclass(frozen=True)
class GlimpsedRow:
    """One sample after the glimpse stage: layers 0..K done, glimpse and pruned tokens dropped."""

    hidden: torch.Tensor  # [L_b, d] layer-K output of the surviving tokens
    positions: torch.Tensor  # [3, L_b] their original M-RoPE positions
    keys: tuple  # per layer 0..K: [kv_heads, L_b, head_dim] (post-RoPE)
    values: tuple
    visual_tokens: list  # per image
    keep_mask: torch.Tensor  # bool [N_v]
    importance_logits: Optional[torch.Tensor]  # [N_v]; None for explicit keep masks
    prompt_tokens: int  # real (unpadded) prompt length before pruning
    reduce_layer: Optional[int] = None  # last layer run at full length (-1: none); None = the modules'

    @property
    def length(self) -> int:
        return int(self.hidden.shape[0])


@dataclass
class PrefillState:
    """Everything decode needs, and what the prefill decided. One row per sample."""

    cache: DynamicCache
    pad_mask: torch.Tensor  # [B, L'] after pruning (left padded)
    next_positions: torch.Tensor  # [B] position of the first generated token
    logits: torch.Tensor  # [B, V] next-token logits
    visual_tokens: list  # per sample: list of per-image token counts
    keep_masks: Optional[list] = None  # per sample: bool [N_v(b)]
    importance_logits: Optional[list] = None  # per sample: float [N_v(b)] or None (explicit keep masks)


class QwenGlimpseModel:
    """Stateless prefill/decode over a stock `Qwen2_5_VLForConditionalGeneration`."""

    def __init__(self, model: nn.Module, modules: Optional[GlimpseModules] = None, strategy=None):
        self.model = model
        self.modules = modules
        self.strategy = strategy  # a `strategies.Strategy` replacing the glimpse modules' pruning, or None
        self.lm = compat.language_model(model)
        self.visual = compat.vision_tower(model)
        self.config = model.config
        self.impl = compat.attn_implementation(model)
        if modules is not None:
            self._check_modules(modules)
        if strategy is not None:  # a layer or block beyond the model's depth fails here, not on the first batch
            strategy.stages(len(self.lm.layers))
            if "vit_attn" in strategy.needs:
                self._vit_block(strategy)

    def _vit_block(self, strategy) -> int:
        full = list(getattr(self.visual, "fullatt_block_indexes", None) or ())
        return strategy.vit_block(len(self.visual.blocks), full)

    def visual_tokens(self, inputs: ModelInputs) -> list:
        """Per sample, the visual-token count of each of its images."""
        return _visual_tokens_per_sample(inputs, self.config.image_token_id, self.visual.spatial_merge_size)

    def _check_modules(self, modules: GlimpseModules) -> None:
        cfg, text = modules.config, compat.text_config(self.model)
        n_layers, n_blocks = len(self.lm.layers), len(self.visual.blocks)
        problems = []
        if cfg.hidden_size != text.hidden_size:
            problems.append(f"hidden_size {cfg.hidden_size} != model {text.hidden_size}")
        if cfg.num_attention_heads != text.num_attention_heads:
            problems.append(f"num_attention_heads {cfg.num_attention_heads} != model {text.num_attention_heads}")
        if max(cfg.selected_layers) > cfg.reduce_layer:
            problems.append(f"selected_layers {list(cfg.selected_layers)} beyond reduce_layer {cfg.reduce_layer}")
        if cfg.reduce_layer >= n_layers:
            problems.append(f"reduce_layer {cfg.reduce_layer} >= {n_layers} decoder layers")
        if any(not 0 <= i < n_blocks for i in cfg.selected_visual_layers):
            problems.append(f"selected_visual_layers {list(cfg.selected_visual_layers)} outside 0..{n_blocks - 1}")
        if problems:
            raise ValueError("glimpse modules do not fit the base model: " + "; ".join(problems))

    # ---- pieces ----------------------------------------------------------------------------
    def visual_features(self, pixel_values, grid_thw, levels: tuple) -> tuple:
        """Image embeddings [N, d] and one [N, C_vit] feature per level (2x2-averaged, raster order)."""
        captured: dict = {}
        me = threading.get_ident()  # hooks are per module, not per call: a forward in another thread fires them too

        def keep(i, out):
            if threading.get_ident() == me:
                captured[i] = out[0] if isinstance(out, tuple) else out

        hooks = [self.visual.blocks[i].register_forward_hook(lambda _m, _a, out, i=i: keep(i, out)) for i in set(levels)]
        try:
            out = self.visual(pixel_values.to(self.visual.dtype), grid_thw=grid_thw)
        finally:
            for hook in hooks:
                hook.remove()
        embeds = out.pooler_output if hasattr(out, "pooler_output") else out
        if not levels:
            return embeds, []
        merge = self.visual.spatial_merge_size
        window_index, _ = _window_index(self.visual, grid_thw)
        reverse = torch.argsort(window_index.to(embeds.device))
        feats = []
        for i in levels:
            block_out = captured[i]  # [seq, C] in window-permuted order
            merged = block_out.view(block_out.shape[0] // merge**2, merge**2, -1).mean(dim=1)
            feats.append(merged[reverse])
        return embeds, feats

    def embed(self, inputs: ModelInputs, levels: tuple) -> tuple:
        embeds = self.lm.embed_tokens(inputs.input_ids)  # [B, L, d]
        feats: list = []
        if inputs.pixel_values is not None:
            image_embeds, feats = self.visual_features(inputs.pixel_values, inputs.image_grid_thw, levels)
            image_mask = (inputs.input_ids == self.config.image_token_id).unsqueeze(-1)
            if int(image_mask.sum()) != image_embeds.shape[0]:
                raise ValueError(
                    f"{int(image_mask.sum())} image tokens in the prompt but {image_embeds.shape[0]} image features"
                )
            embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        return embeds, feats

    def positions(self, inputs: ModelInputs) -> torch.Tensor:
        """Stock M-RoPE positions [3, B, L] (padding at 0)."""
        ids = inputs.input_ids
        if inputs.image_grid_thw is None:
            pos = (inputs.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            return pos[None].expand(3, -1, -1).clone()
        mm_types = (ids == self.config.image_token_id).int()
        owner = compat.rope_index_owner(self.model)
        pos, _ = owner.get_rope_index(
            ids, mm_token_type_ids=mm_types, image_grid_thw=inputs.image_grid_thw, attention_mask=inputs.attention_mask
        )
        return pos

    def run_layers(self, layers: range, hidden, pad_mask, position_ids, cache, on_layer=None):
        q_len = hidden.shape[1]
        mask = compat.attention_mask(pad_mask, q_len, self.impl, hidden.dtype)
        rope = self.lm.rotary_emb(hidden, position_ids)
        for i in layers:
            if on_layer is not None:
                hidden = on_layer(i, hidden, rope, before=True)
            hidden = compat.run_decoder_layer(self.lm.layers[i], hidden, mask, rope, cache)
            if on_layer is not None:
                on_layer(i, hidden, rope, before=False)
        return hidden

    def glimpse_query(self, layer_idx: int, hidden, rope) -> torch.Tensor:
        """Post-RoPE query of the last (glimpse) row at one layer: [B, heads, head_dim]."""
        layer = self.lm.layers[layer_idx]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden[:, -1:])  # [B, 1, d]
        q = attn.q_proj(x).view(x.shape[0], 1, -1, attn.head_dim).transpose(1, 2)  # [B, H, 1, hd]
        cos, sin = rope[0][:, -1:].unsqueeze(1), rope[1][:, -1:].unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        return q[:, :, 0]

    def next_token_logits(self, hidden) -> torch.Tensor:
        return self.model.lm_head(self.lm.norm(hidden[:, -1:]))[:, 0].float()  # [B, V]

    # ---- prefill -----------------------------------------------------------------------------
    def prefill(
        self, inputs: ModelInputs, rule: Optional[KeepRule] = None, keep_masks: Optional[list] = None, keep_layer: Optional[int] = None,
        rules: Optional[list] = None, seeds: Optional[list] = None,
    ) -> PrefillState:
        """Plain prefill when no glimpse modules are attached (or rule is None), else GlimpsePrune.

        keep_masks (per sample bool [N_v(b)]) replace the keep rule: the rows are pruned after
        `keep_layer` (None = the modules' reduce_layer, -1 = before layer 0) by `masked_stage`.
        """
        visual = _visual_tokens_per_sample(inputs, self.config.image_token_id, self.visual.spatial_merge_size)
        if keep_masks is not None:
            return self.finish_prefill(self.masked_stage(inputs, keep_masks, keep_layer, visual))
        if not self.can_prune or rule is None or inputs.pixel_values is None:
            return self._plain_prefill(inputs, visual)
        return self.finish_prefill(self.prune_stage(inputs, rule, rules, seeds, visual=visual))

    @property
    def can_prune(self) -> bool:
        return self.modules is not None or self.strategy is not None

    def prune_stage(self, inputs: ModelInputs, rule: KeepRule, rules: Optional[list] = None, seeds: Optional[list] = None,
                    visual: Optional[list] = None) -> list:
        """The first half of a pruned prefill by the engine's pruning: the strategy's (`strategy_stage`,
        budget = the rule's fixed_remain_ratio) when one is set, else GlimpsePrune's (`glimpse_stage`)."""
        if self.strategy is None:
            return self.glimpse_stage(inputs, rule, visual, rules)
        own = list(rules) if rules is not None else [None] * inputs.input_ids.shape[0]
        ratios = [(r if r is not None else rule).fixed_remain_ratio for r in own]
        if any(r is None for r in ratios):
            raise ValueError(f"pruning strategy {self.strategy.name!r} needs a keep ratio (KeepRule.fixed_remain_ratio)")
        return self.strategy_stage(inputs, self.strategy, ratios, seeds, visual)

    def _plain_prefill(self, inputs: ModelInputs, visual: list) -> PrefillState:
        hidden, _ = self.embed(inputs, ())
        positions = self.positions(inputs)
        cache = DynamicCache(config=compat.text_config(self.model))
        pad = inputs.attention_mask
        hidden = self.run_layers(range(len(self.lm.layers)), hidden, pad, positions, cache)
        return PrefillState(cache, pad, positions.amax(dim=(0, 2)) + 1, self.next_token_logits(hidden), visual)

    def glimpse_stage(self, inputs: ModelInputs, rule: KeepRule, visual: Optional[list] = None, rules: Optional[list] = None) -> list:
        """Layers 0..K with the glimpse, the VIP and the keep rule: one `GlimpsedRow` per sample.

        rules: optional per-sample keep rules (None entries take `rule`), e.g. a row's own threshold.
        Rows from different batches can be regrouped (by retained length) before `finish_prefill`.
        """
        if visual is None:
            visual = _visual_tokens_per_sample(inputs, self.config.image_token_id, self.visual.spatial_merge_size)
        cfg = self.modules.config
        hidden, feats = self.embed(inputs, tuple(cfg.selected_visual_layers))
        positions = self.positions(inputs)
        bsz = hidden.shape[0]
        # Append the glimpse: embedding e_0, position last + 1 on every axis, attention 1.
        e0 = self.modules.glimpse_vector(0).to(hidden.dtype)
        hidden = torch.cat([hidden, e0.expand(bsz, -1, -1)], dim=1)  # [B, L+1, d]
        positions = torch.cat([positions, positions[-1:, :, -1:].expand(3, -1, -1) + 1], dim=2)
        pad = torch.cat([inputs.attention_mask, inputs.attention_mask.new_ones(bsz, 1)], dim=1)
        is_image = inputs.input_ids == self.config.image_token_id  # [B, L]
        cache = DynamicCache(config=compat.text_config(self.model))
        attn_rows: dict = {}
        queries: dict = {}

        def on_layer(i, h, rope, before):
            if before:
                e = self.modules.glimpse_vector(i) if i > 0 else None
                if e is not None:
                    h = torch.cat([h[:, :-1], h[:, -1:] + e.to(h.dtype)], dim=1)
                if i in cfg.selected_layers:
                    queries[i] = self.glimpse_query(i, h, rope)
                return h
            if i in cfg.selected_layers:
                attn_rows[i] = self._glimpse_attention(i, queries.pop(i), cache, is_image)

        k_last = cfg.reduce_layer
        hidden = self.run_layers(range(k_last + 1), hidden, pad, positions, cache, on_layer)
        attn_in = torch.cat([attn_rows[i] for i in cfg.selected_layers], dim=-1)  # [N, n_sel*H]
        grids = (inputs.image_grid_thw[:, 1:] // self.visual.spatial_merge_size).tolist()
        logits_all = self.modules.attn_fuser(attn_in, feats, [tuple(g) for g in grids])  # [N]
        per_sample = torch.split(logits_all, [sum(v) for v in visual])
        own = list(rules) if rules is not None else [None] * len(per_sample)
        keeps = keep_masks(per_sample, [r if r is not None else rule for r in own])
        # Drop the glimpse (last slot), then the pruned visual tokens; each row keeps its survivors.
        return self._compact(
            _Stage(hidden[:, :-1], positions[:, :, :-1], inputs, cache, k_last, visual, drop_last_kv=True), keeps, per_sample
        )

    def strategy_stage(self, inputs: ModelInputs, strategy, ratios: list, seeds: Optional[list] = None,
                       visual: Optional[list] = None) -> list:
        """A `strategies.Strategy` on a batch: one `GlimpsedRow` per sample, as `glimpse_stage` gives.

        Runs the plain prompt up to each of the strategy's pruning layers in turn (-1: before layer 0),
        builds the signals it needs there (`strategies.Signals`), lets it choose each row's survivors
        under that row's budget (ratios: per row its keep ratio; k = strategies.keep_count), and drops
        the rest from hidden states, positions and the KV cache of every layer so far, re-left-padding
        between stages. seeds: per row, its prune seed for random choices (None: 0)."""
        from .strategies import Signals, keep_count, row_generator

        if visual is None:
            visual = _visual_tokens_per_sample(inputs, self.config.image_token_id, self.visual.spatial_merge_size)
        n_layers = len(self.lm.layers)
        stages = strategy.stages(n_layers)
        needs = strategy.needs
        if "embeds" in needs and stages != [-1]:
            raise ValueError(f"strategy {strategy.name!r} reads input embeddings, so it must prune before the LLM (layer -1)")
        if "vit_attn" in needs:
            block = self._vit_block(strategy)
            with _capture_attention_inputs(self.visual.blocks[block].attn) as captured:
                hidden, _ = self.embed(inputs, ())
            vit_attn, vit_keys = self._vit_signals(self.visual.blocks[block].attn, captured, inputs, hidden.shape[:2])
        else:
            hidden, _ = self.embed(inputs, ())
        positions = self.positions(inputs)
        pad = inputs.attention_mask
        ids = inputs.input_ids
        bsz, device = ids.shape[0], ids.device
        is_image = (ids == self.config.image_token_id) & pad.bool()
        vis_idx = torch.full_like(ids, -1)
        totals = [sum(v) for v in visual]
        if sum(totals):
            vis_idx[is_image] = torch.cat([torch.arange(t, device=device) for t in totals])
        grids = _sample_grids(inputs, visual, self.visual.spatial_merge_size)
        budgets = [strategy.stage_budgets(t, keep_count(t, r), n_layers) for t, r in zip(totals, ratios)]
        seeds = list(seeds) if seeds is not None else [None] * bsz
        gens = [row_generator(getattr(strategy, "seed", 0), s) for s in seeds]
        cache = DynamicCache(config=compat.text_config(self.model))
        done = -1
        for s, layer in enumerate(stages):
            queries: dict = {}

            def on_layer(i, h, rope, before, layer=layer):
                if before and i == layer and "attn" in needs:
                    queries["q"] = self.glimpse_query(i, h, rope)
                return h

            hidden = self.run_layers(range(done + 1, layer + 1), hidden, pad, positions, cache, on_layer)
            done = layer
            attn = self._last_token_attention(queries["q"], cache, layer, pad) if "attn" in needs else None
            keys = compat.cache_keys(cache, layer) if "keys" in needs else None
            keep_slot = pad.bool() & ~is_image
            for b in range(bsz):
                sel = is_image[b]
                n = int(sel.sum())
                if n == 0:
                    continue
                sig = Signals(
                    n=n, original=vis_idx[b][sel], grids=grids[b],
                    embeds=hidden[b][sel] if layer == -1 else None,
                    hidden=hidden[b][sel] if "hidden" in needs else None,
                    keys=keys[b][:, sel].transpose(0, 1).reshape(n, -1) if keys is not None else None,
                    attn=attn[b][sel] if attn is not None else None,
                    vit_attn=vit_attn[b][sel] if "vit_attn" in needs else None,
                    vit_keys=vit_keys[b][sel] if "vit_attn" in needs else None,
                    text=hidden[b][pad[b].bool() & ~is_image[b]] if "text" in needs else None,
                    generator=gens[b],
                )
                mask, merged = strategy.apply(sig, budgets[b][s])
                mask = mask.to(device)
                if mask.shape != (n,) or int(mask.sum()) != budgets[b][s]:
                    raise RuntimeError(f"strategy {strategy.name!r} kept {int(mask.sum())} of {n} tokens, not its budget {budgets[b][s]}")
                keep_slot[b, sel] = mask
                if merged is not None:  # merged tokens: new input embeddings for the kept ones
                    if layer != -1:
                        raise RuntimeError(f"strategy {strategy.name!r} merges tokens, which only works before the LLM")
                    hidden[b, sel.nonzero().squeeze(1)[mask]] = merged.to(hidden.dtype)
            last = s == len(stages) - 1
            if last and not strategy.reindex:
                break
            hidden, positions, pad, is_image, vis_idx, cache = self._repad(keep_slot, hidden, positions, is_image, vis_idx, cache, layer)
            if strategy.reindex:
                positions = self._reindex(hidden, positions, pad, cache, layer)
            if last:
                keep_slot = pad.bool()
        rows = []
        for b in range(bsz):
            sel = keep_slot[b]
            kept = vis_idx[b][sel & is_image[b]]
            keep = torch.zeros(totals[b], dtype=torch.bool, device=device)
            keep[kept] = True
            rows.append(GlimpsedRow(
                hidden=hidden[b][sel],
                positions=positions[:, b][:, sel],
                keys=tuple(compat.cache_keys(cache, i)[b][:, sel] for i in range(done + 1)),
                values=tuple(compat.cache_values(cache, i)[b][:, sel] for i in range(done + 1)),
                visual_tokens=visual[b],
                keep_mask=keep,
                importance_logits=None,
                prompt_tokens=int(inputs.attention_mask[b].sum()),
                reduce_layer=done,
            ))
        return rows

    def _vit_signals(self, attn: nn.Module, captured: dict, inputs: ModelInputs, shape) -> tuple:
        """From one ViT attention module's captured inputs: per visual token, the attention it receives
        (mean over heads and over its image's query patches, summed over its 2x2 patches) and its
        pre-RoPE keys (mean over the 2x2 patches, heads concatenated), scattered to [B, L] / [B, L, C]
        at the image tokens. The column sums run over query chunks (no S x S matrix)."""
        hidden, cu = captured["hidden_states"], captured["cu_seqlens"].tolist()
        cos, sin = captured["position_embeddings"]
        seq = hidden.shape[0]
        heads = attn.num_heads
        q, k, _ = attn.qkv(hidden).reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # [S, h, hd]
        raw_keys = k.reshape(seq, -1)
        q = q.float() * cos.unsqueeze(-2).float() + _rotate_half(q.float()) * sin.unsqueeze(-2).float()
        k = k.float() * cos.unsqueeze(-2).float() + _rotate_half(k.float()) * sin.unsqueeze(-2).float()
        received = torch.zeros(seq, device=hidden.device)
        for start, end in zip(cu[:-1], cu[1:]):
            qs, ks = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1)  # [h, n, hd]
            n = end - start
            chunk = max(1, (1 << 24) // max(1, heads * n))
            col = torch.zeros(heads, n, device=hidden.device)
            for c in range(0, n, chunk):
                col += (torch.matmul(qs[:, c:c + chunk], ks.transpose(-1, -2)) * attn.scaling).softmax(dim=-1).sum(dim=1)
            received[start:end] = col.mean(dim=0) / n
        unit = self.visual.spatial_merge_size ** 2
        window_index, _ = _window_index(self.visual, inputs.image_grid_thw)
        reverse = torch.argsort(window_index.to(hidden.device))
        scores = received.view(seq // unit, unit).sum(dim=1)[reverse]
        keys = raw_keys.float().view(seq // unit, unit, -1).mean(dim=1)[reverse]
        is_image = inputs.input_ids == self.config.image_token_id
        out_scores = scores.new_zeros(shape)
        out_scores[is_image] = scores
        out_keys = keys.new_zeros(*shape, keys.shape[-1])
        out_keys[is_image] = keys
        return out_scores, out_keys

    def _last_token_attention(self, query, cache, layer_idx, pad) -> torch.Tensor:
        """Softmax attention of the last (prompt) token over every key at one layer, mean over heads: [B, L]."""
        keys = compat.cache_keys(cache, layer_idx)  # [B, kv_heads, L, hd] (post-RoPE)
        keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
        logits = torch.matmul(query.unsqueeze(2).float(), keys.float().transpose(-1, -2)).squeeze(2) / keys.shape[-1] ** 0.5
        logits = logits.masked_fill(~pad.bool()[:, None, :], float("-inf"))
        return logits.softmax(dim=-1).mean(dim=1)

    def _reindex(self, hidden, positions, pad, cache, k_last) -> torch.Tensor:
        """Contiguous positions after pruning: every kept token's three M-RoPE coordinates become its
        index among its row's kept tokens (the 1-D re-indexing FastV/PDrop do on LLaVA). The cached
        keys of layers 0..k_last were rotated at the old positions; RoPE rotations compose, so rotating
        them by (new - old) makes them exactly the keys the new positions give."""
        new = (pad.long().cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1).contiguous()
        new = new.masked_fill(~pad.bool()[None], 0)
        if k_last >= 0:
            cos, sin = self.lm.rotary_emb(hidden, new - positions)  # [B, L, hd]
            cos, sin = cos[:, None].float(), sin[:, None].float()
            for i in range(k_last + 1):
                keys = compat.cache_keys(cache, i)  # [B, kv_heads, L, hd]
                keys.copy_((keys.float() * cos + _rotate_half(keys.float()) * sin).to(keys.dtype))
        return new

    def _repad(self, keep_slot, hidden, positions, is_image, vis_idx, cache, k_last):
        """Drop the unkept slots of a batch and left-pad it again (hidden, positions, masks, the KV cache
        of layers 0..k_last); padded slots are zero with position 0, as in `finish_prefill`."""
        lengths = keep_slot.sum(dim=1)
        new_len = int(lengths.max())
        slots = torch.arange(new_len, device=keep_slot.device)[None, :] >= (new_len - lengths)[:, None]
        bsz = keep_slot.shape[0]
        new_hidden = hidden.new_zeros(bsz, new_len, hidden.shape[-1])
        new_hidden[slots] = hidden[keep_slot]
        new_pos = positions.new_zeros(3, bsz, new_len)
        new_pos[:, slots] = positions[:, keep_slot]
        new_image = torch.zeros_like(slots)
        new_image[slots] = is_image[keep_slot]
        new_idx = torch.full_like(slots, -1, dtype=vis_idx.dtype)
        new_idx[slots] = vis_idx[keep_slot]
        new_cache = DynamicCache(config=compat.text_config(self.model))
        for i in range(k_last + 1):
            kv = []
            for t in (compat.cache_keys(cache, i), compat.cache_values(cache, i)):
                src = t.transpose(1, 2)  # [B, L, h, d]
                out = src.new_zeros(bsz, new_len, src.shape[2], src.shape[3])
                out[slots] = src[keep_slot]
                kv.append(out.transpose(1, 2).contiguous())
            new_cache.update(kv[0], kv[1], i)
        return new_hidden, new_pos, slots.long(), new_image, new_idx, new_cache

    def masked_stage(
        self, inputs: ModelInputs, keep_masks: list, keep_layer: Optional[int] = None, visual: Optional[list] = None
    ) -> list:
        """Layers 0..keep_layer on the plain prompt, then drop the visual tokens the caller's masks do not
        keep: one `GlimpsedRow` per sample, as `glimpse_stage` gives, for `finish_prefill`.

        keep_masks: per sample, bool [N_v(b)] over its visual tokens (all its images, token order); an
        all-False mask keeps no visual token. keep_layer: None = the modules' reduce_layer; -1 = prune
        the LLM's input embeddings (no layer runs at full length).
        """
        if visual is None:
            visual = _visual_tokens_per_sample(inputs, self.config.image_token_id, self.visual.spatial_merge_size)
        k_last = self._keep_layer(keep_layer)
        keeps = _check_keep_masks(keep_masks, visual, inputs.input_ids.device)
        hidden, _ = self.embed(inputs, ())
        positions = self.positions(inputs)
        cache = DynamicCache(config=compat.text_config(self.model))
        hidden = self.run_layers(range(k_last + 1), hidden, inputs.attention_mask, positions, cache)
        return self._compact(_Stage(hidden, positions, inputs, cache, k_last, visual, drop_last_kv=False), keeps, None)

    def _keep_layer(self, keep_layer: Optional[int]) -> int:
        n_layers = len(self.lm.layers)
        if keep_layer is None:
            if self.modules is None:
                raise ValueError("explicit keep masks without glimpse modules need a keep_layer (-1 = before layer 0)")
            keep_layer = self.modules.config.reduce_layer
        if not -1 <= int(keep_layer) < n_layers:
            raise ValueError(f"keep_layer must be in -1..{n_layers - 1} for {n_layers} decoder layers, got {keep_layer}")
        return int(keep_layer)

    def _compact(self, st: "_Stage", keeps: list, importance: Optional[tuple]) -> list:
        """Per sample: keep the text tokens and the kept visual tokens of hidden, positions and the KV
        cache of layers 0..st.k_last (survivors keep their original positions)."""
        ids, pad = st.inputs.input_ids, st.inputs.attention_mask
        is_image = ids == self.config.image_token_id  # [B, L]
        remain = pad.bool().clone()
        if keeps:
            remain[is_image] = torch.cat(keeps).to(remain.device) & remain[is_image]
        end = -1 if st.drop_last_kv else None  # the glimpse's slot in the cache
        kv = [(compat.cache_keys(st.cache, i)[:, :, :end], compat.cache_values(st.cache, i)[:, :, :end]) for i in range(st.k_last + 1)]
        rows = []
        for b in range(ids.shape[0]):
            sel = remain[b]
            rows.append(GlimpsedRow(
                hidden=st.hidden[b][sel],
                positions=st.positions[:, b][:, sel],
                keys=tuple(k[b][:, sel] for k, _ in kv),
                values=tuple(v[b][:, sel] for _, v in kv),
                visual_tokens=st.visual[b],
                keep_mask=keeps[b],
                importance_logits=importance[b] if importance is not None else None,
                prompt_tokens=int(pad[b].sum()),
                reduce_layer=st.k_last,
            ))
        return rows

    def finish_prefill(self, rows: list) -> PrefillState:
        """Left-pad glimpsed rows into one batch, run layers K+1..L-1, and take next-token logits.

        All rows must have been pruned after the same layer K (their caches hold layers 0..K)."""
        layers = {self._keep_layer(r.reduce_layer) for r in rows}
        if len(layers) != 1:
            raise ValueError(f"rows pruned after different layers {sorted(layers)} cannot be finished together")
        k_last = layers.pop()
        lengths = torch.tensor([r.length for r in rows])
        new_len = int(lengths.max())
        device = rows[0].hidden.device
        slots = torch.arange(new_len)[None, :] >= (new_len - lengths)[:, None]  # [B, L']
        slots = slots.to(device)
        hidden = rows[0].hidden.new_zeros(len(rows), new_len, rows[0].hidden.shape[-1])
        hidden[slots] = torch.cat([r.hidden for r in rows])
        positions = rows[0].positions.new_zeros(3, len(rows), new_len)
        positions[:, slots] = torch.cat([r.positions for r in rows], dim=1)
        cache = DynamicCache(config=compat.text_config(self.model))
        for i in range(k_last + 1):
            cache.update(_pad_rows([r.keys[i] for r in rows], slots), _pad_rows([r.values[i] for r in rows], slots), i)
        pad = slots.long()
        hidden = self.run_layers(range(k_last + 1, len(self.lm.layers)), hidden, pad, positions, cache)
        next_pos = positions.masked_fill(~slots[None], 0).amax(dim=(0, 2)) + 1
        return PrefillState(
            cache, pad, next_pos, self.next_token_logits(hidden), [r.visual_tokens for r in rows],
            [r.keep_mask for r in rows], [r.importance_logits for r in rows],
        )

    @staticmethod
    def glimpse_logits(layer_idx, query, cache) -> torch.Tensor:
        """Raw logits of the glimpse query [B, H, hd] over every cached key of one layer: [B, H, L+1]."""
        keys = compat.cache_keys(cache, layer_idx)  # [B, kv_heads, L+1, hd] (post-RoPE)
        groups = query.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(groups, dim=1)  # [B, H, L+1, hd]
        head_dim = keys.shape[-1]
        return torch.matmul(query.unsqueeze(2), keys.transpose(-1, -2)).squeeze(2) / head_dim**0.5  # [B, H, L+1]

    def _glimpse_attention(self, layer_idx, query, cache, is_image) -> torch.Tensor:
        """Raw logits of the glimpse query over each sample's visual keys: [N_total, heads]."""
        logits = self.glimpse_logits(layer_idx, query, cache)[:, :, :-1].transpose(1, 2)  # [B, L, H]
        return logits[is_image]  # [N_total, H], samples in batch order

    # ---- decode -------------------------------------------------------------------------------
    def decode_step(self, token_ids, positions, pad_mask, cache) -> torch.Tensor:
        """token_ids [B], positions [B], pad_mask [B, KV] incl. the new token -> logits [B, V]."""
        hidden = self.lm.embed_tokens(token_ids[:, None])  # [B, 1, d]
        pos = positions.view(1, -1, 1).expand(3, -1, -1)
        hidden = self.run_layers(range(len(self.lm.layers)), hidden, pad_mask, pos, cache)
        return self.next_token_logits(hidden)


@dataclass(frozen=True)
class _Stage:
    """The full-length state after layers 0..k_last, before compaction."""

    hidden: torch.Tensor  # [B, L, d]
    positions: torch.Tensor  # [3, B, L]
    inputs: ModelInputs
    cache: DynamicCache  # layers 0..k_last, [B, kv_heads, L (+1 glimpse), hd]
    k_last: int
    visual: list  # per sample: per-image token counts
    drop_last_kv: bool  # the cache holds one extra (glimpse) slot at the end


def _check_keep_masks(keep_masks, visual: list, device) -> list:
    """Explicit keep masks -> per sample bool [N_v(b)] tensors on device; lengths checked."""
    if len(keep_masks) != len(visual):
        raise ValueError(f"{len(keep_masks)} keep masks for {len(visual)} rows")
    out = []
    for b, (mask, per_image) in enumerate(zip(keep_masks, visual)):
        mask = torch.as_tensor(mask, dtype=torch.bool).reshape(-1).to(device)
        if mask.numel() != sum(per_image):
            raise ValueError(f"row {b}: keep mask has {mask.numel()} entries, the row has {sum(per_image)} visual tokens")
        out.append(mask)
    return out


def _sample_grids(inputs: ModelInputs, visual: list, merge: int) -> list:
    """Per sample, per image: (merged grid height, width, index of its first token in the sample)."""
    if inputs.image_grid_thw is None:
        return [[] for _ in visual]
    thw = inputs.image_grid_thw.tolist()
    out, k = [], 0
    for per_image in visual:
        mine, first = [], 0
        for count in per_image:
            t, h, w = thw[k]
            mine.append((t * h // merge, w // merge, first))
            first += count
            k += 1
        out.append(mine)
    return out


def _pad_rows(per_row: list, slots: torch.Tensor) -> torch.Tensor:
    """Per-row [h, L_b, d] tensors -> one left-padded [B, h, L', d] tensor (padding zero)."""
    heads, dim = per_row[0].shape[0], per_row[0].shape[-1]
    out = per_row[0].new_zeros(slots.shape[0], slots.shape[1], heads, dim)  # [B, L', h, d]
    out[slots] = torch.cat([t.transpose(0, 1) for t in per_row])
    return out.transpose(1, 2).contiguous()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@contextlib.contextmanager
def _capture_attention_inputs(attn: nn.Module):
    """While open, records the inputs of one ViT attention module's forward (hidden_states,
    cu_seqlens, position_embeddings) into the yielded dict."""
    captured: dict = {}

    def hook(_module, args, kwargs):
        names = ("hidden_states", "cu_seqlens", "position_embeddings")
        captured.update(zip(names, args))
        captured.update({k: kwargs[k] for k in names if k in kwargs})

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def _window_index(visual, grid_thw):
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(
        grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size, patch_size=visual.patch_size
    )


def _visual_tokens_per_sample(inputs: ModelInputs, image_token_id: int, merge: int) -> list:
    """Per sample, the token count of each of its images (images are consumed in batch order)."""
    if inputs.image_grid_thw is None:
        return [[] for _ in range(inputs.input_ids.shape[0])]
    per_image = (inputs.image_grid_thw.prod(-1) // merge**2).tolist()
    counts = (inputs.input_ids == image_token_id).sum(dim=1).tolist()
    out, k = [], 0
    for total in counts:
        mine = []
        while total > 0:
            if k >= len(per_image):
                raise ValueError("more image tokens in the prompts than images in image_grid_thw")
            mine.append(per_image[k])
            total -= per_image[k]
            k += 1
        if total != 0:
            raise ValueError("image tokens of a prompt do not add up to whole images")
        out.append(mine)
    if k != len(per_image):
        raise ValueError(f"{len(per_image)} images given but the prompts use {k}")
    return out
