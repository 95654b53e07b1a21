"""Continuous batching by KV budget: rows join the running decode batch as soon as the cache budget
allows and leave it the step they finish.

`ContinuousScheduler(engine, config).run(requests, sampling)` yields `(index, GenerationResult)` as
rows finish (not in input order). `.session(sampling)` gives the same loop one step at a time
(`Session.step`), taking new requests between steps (`Session.submit`): the model actor feeds it
block after block (`workers.generate.EngineLoop`), so rows keep flowing across Ray batches. Per loop
iteration (step):

  1. **Glimpse chunks.** While the decode batch has free slots and too few rows are ready to fill
     them, the next chunk of waiting requests (packed by raw tokens under `prefill_tokens`) goes
     through the first half of the prefill: layers 0..K with the glimpse, the VIP, the keep rule and
     the compaction (`QwenGlimpseModel.glimpse_stage`). The result is one `GlimpsedRow` per request,
     holding its retained tokens only. Unpruned engines run every layer in this stage
     (`masked_stage` with all-True masks after the last layer), so both modes share the rest.
  2. **Admission by KV budget.** Ready rows are taken in order (first fit) while the batch, if they
     joined, could never outgrow the budget: `rows x max_future_width x layers <= kv_budget_tokens`,
     where a row's future width is its cache length plus the tokens it may still generate. The
     cache is one left-padded rectangle per layer, so the padding is counted, and nothing is ever
     preempted. Every layer's cache holds the retained length: GlimpsePrune drops the pruned tokens
     from the KV cache of layers 0..K as well (reference, step 7), so a pruned row costs
     `layers x (prompt + kept + new)` cache tokens against `layers x (prompt + visual + new)`.
     A row alone over the budget still runs when the batch is empty (it must run somehow).
  3. The admitted rows finish their prefill together (`finish_prefill`: layers K+1..L-1) and their
     caches are merged into the running batch (left-padded to the wider of the two).
  4. **One decode step** for every running row: select each row's next token (greedy, or sampling
     with the row's own generator, so a row's draws never depend on its neighbours), finished rows
     (EOS or their own `max_new_tokens`) are emitted and dropped from the cache at once, fully padded
     leading columns are trimmed, and the rest take one decoder step.

Greedy output per row equals its batch-of-1 output (tests/unit/test_scheduler.py). Hot-path work on
the batch is tensor-wide (token selection, stop test, row removal, trimming, merging); the Python
loops left are per step over the *finished* rows (building results) and per generated token
(appending ids to each row's list).

Timing is shared honestly: a glimpse chunk's seconds are split evenly over its rows (they are padded
to one length, so each costs the same), a finishing group's seconds likewise, and each decode step's
seconds over the rows in that step. `SchedulerStats` holds the batch-level figures (achieved
concurrency, KV-budget use, padding, prefill and decode tokens per second).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from . import compat
from .api import GenerationRequest, GenerationResult, SamplingParams
from .qwen2_5_vl import GlimpsedRow, PrefillState
from .engine import request_limits
from .sampling import base_seed, row_sampling, select_next


@dataclass(frozen=True)
class SchedulerConfig:
    """kv_budget_tokens: cache tokens across all layers (rows x cache length x layers, padding
    included) the running batch may ever hold. max_rows: rows decoding at once. prefill_tokens: raw
    tokens (prompt + visual, padded) per glimpse chunk. prime_rows: when glimpsed rows must be
    finished (layers K+1..L-1) to join, up to this many are finished in one call; those that do not
    join yet wait with their caches (at most prime_rows - 1 rows, outside the KV budget) for the next
    free slots, so a slot freed one at a time does not cost a one-row forward through the top layers."""

    kv_budget_tokens: int
    max_rows: int = 64
    prefill_tokens: int = 32_768
    prime_rows: int = 4

    def __post_init__(self) -> None:
        for name in ("kv_budget_tokens", "max_rows", "prefill_tokens", "prime_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class SchedulerStats:
    """Batch-level figures of one or more `run` calls (sums; the properties give the ratios)."""

    kv_budget_tokens: int = 0
    decode_steps: int = 0
    row_steps: int = 0  # sum over steps of rows in the step
    cache_slots: int = 0  # sum over steps of the rectangle (rows x width x layers)
    cache_real: int = 0  # sum over steps of the real (unpadded) cache tokens
    peak_rows: int = 0
    prefill_tokens: int = 0  # real prompt tokens prefilled (before pruning)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    admissions: int = 0
    output_tokens: int = 0
    rows_over_budget: int = 0  # rows that alone exceed the budget (run by themselves)
    queued_steps: int = 0  # decode steps taken while rows were still waiting to join (queued or glimpsed)
    queued_row_steps: int = 0  # rows in those steps
    surgery_s: float = 0.0  # time spent copying the cache when rows join (merge) or leave (select)
    finish_calls: int = 0  # forwards through layers K+1..L-1 of rows about to join (`prime_rows` batches them)

    @property
    def achieved_concurrency(self) -> float:
        return self.row_steps / self.decode_steps if self.decode_steps else 0.0

    @property
    def steady_concurrency(self) -> float:
        """Rows per decode step while rows were waiting: max_rows (or what the KV budget allows) means
        no slot stood empty while there was work for it; the rest of `achieved_concurrency`'s gap is
        the drain at the end of the input, when nothing is left to join."""
        return self.queued_row_steps / self.queued_steps if self.queued_steps else 0.0

    @property
    def kv_budget_use(self) -> float:
        """Mean share of the budget the cache rectangle occupied per decode step."""
        return self.cache_slots / (self.decode_steps * self.kv_budget_tokens) if self.decode_steps else 0.0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.cache_real / self.cache_slots if self.cache_slots else 0.0

    def as_dict(self) -> dict:
        return {
            "kv_budget_tokens": self.kv_budget_tokens, "decode_steps": self.decode_steps, "row_steps": self.row_steps,
            "achieved_concurrency": self.achieved_concurrency, "peak_rows": self.peak_rows,
            "kv_budget_use": self.kv_budget_use, "padding_fraction": self.padding_fraction,
            "prefill_tokens": self.prefill_tokens, "prefill_s": self.prefill_s,
            "prefill_tokens_per_s": self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0,
            "decode_s": self.decode_s, "output_tokens": self.output_tokens,
            "decode_tokens_per_s": self.output_tokens / self.decode_s if self.decode_s else 0.0,
            "admissions": self.admissions, "rows_over_budget": self.rows_over_budget,
            "queued_steps": self.queued_steps, "steady_concurrency": self.steady_concurrency, "surgery_s": self.surgery_s,
            "finish_calls": self.finish_calls,
        }


@dataclass
class _Ready:
    """A glimpsed row waiting for admission."""

    index: int
    row: GlimpsedRow
    seconds: float  # its share of the glimpse chunk
    limit: int  # its max_new_tokens


@dataclass
class _Running:
    """The decode batch: per-layer left-padded caches and per-row bookkeeping (slot order)."""

    cache: object  # DynamicCache, one [B, h, W, d] tensor pair per layer
    pad: torch.Tensor  # [B, W]
    next_pos: torch.Tensor  # [B] position of the token each row feeds next
    logits: torch.Tensor  # [B, V] pending next-token logits
    index: list  # request index per slot
    limit: torch.Tensor  # [B] max_new_tokens per row
    made: torch.Tensor  # [B] tokens generated so far
    sampling: list  # per slot: its `sampling.RowSampling`
    tokens: list  # per slot: generated ids
    prefill_s: list  # per slot
    decode_s: list  # per slot
    share: list  # per slot: sum over its steps of 1 / rows in the step
    pad_acc: list  # per slot: sum over its steps of the batch's padding share
    kv_acc: list  # per slot: sum over its steps of the batch's share of the KV budget
    rows: list  # per slot: its GlimpsedRow (visual counts, keep mask, importance logits)
    feed: Optional[torch.Tensor] = None  # [B] tokens picked from `logits`, to feed at the next decode step

    @property
    def size(self) -> int:
        return len(self.index)

    @property
    def width(self) -> int:
        return int(self.pad.shape[1])


class ContinuousScheduler:
    """Runs requests through a `GlimpseEngine` with continuous batching under a KV budget."""

    def __init__(self, engine, config: SchedulerConfig, stats: Optional[SchedulerStats] = None):
        self.engine = engine
        self.config = config
        self.stats = stats if stats is not None else SchedulerStats()
        self.stats.kv_budget_tokens = config.kv_budget_tokens

    def run(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams = SamplingParams(), prune: bool = True,
        return_masks: bool = False,
    ) -> Iterator[tuple[int, GenerationResult]]:
        """Yield (request index, result) as rows finish. A request may set its own max_new_tokens and
        seed. Requests with explicit keep masks are not supported here (use `engine.generate`)."""
        session = self.session(sampling, prune, return_masks)
        session.submit(requests)
        while session.busy:
            yield from session.step()

    def session(self, sampling: SamplingParams = SamplingParams(), prune: bool = True,
                return_masks: bool = False) -> "Session":
        """A scheduler state that takes new requests at any step (`Session.submit`), so rows of later
        batches join the decode batch while earlier ones are still running."""
        return Session(self, sampling, prune, return_masks)


class Session:
    """One running continuous batch. `submit(requests)` queues rows (any time, also between steps)
    and returns their indices; `step()` runs one loop iteration (glimpse chunks while slots are
    free, admission, one decode step) and returns the rows that finished in it; `busy` says whether
    rows are queued or running. After a failed step, `abort()` drops the rows that had started and
    returns them (the caller decides what to do with them); queued rows stay. Indices count up over
    the session's life. Not thread-safe: one thread steps it."""

    def __init__(self, scheduler: ContinuousScheduler, sampling: SamplingParams, prune: bool, return_masks: bool):
        self.engine = scheduler.engine
        self.core = scheduler.engine.core
        self.config = scheduler.config
        self.layers = len(self.core.lm.layers)
        self.stats = scheduler.stats
        self._prune = prune and self.engine.prunes
        self._sampling = sampling
        self._return_masks = return_masks
        self._base_seed = base_seed(sampling)
        self._requests: dict = {}  # index -> request, while unfinished
        self._next = 0
        self._waiting: deque = deque()
        self._ready: deque = deque()
        self._run: Optional[_Running] = None
        self._primed: Optional[_Running] = None  # ready rows already finished to the top layer (not decoding)
        self._eos = torch.tensor(self.engine.eos_ids, device=self.engine.device)
        self._pick_s = 0.0  # time of this step's picks, counted with its decode

    def submit(self, requests: Sequence[GenerationRequest]) -> list:
        if any(r.keep_mask is not None for r in requests):
            raise ValueError("the continuous scheduler runs the keep rule; explicit keep masks go through engine.generate")
        indices = list(range(self._next, self._next + len(requests)))
        self._next += len(requests)
        self._requests.update(zip(indices, requests))
        self._waiting.extend(indices)
        return indices

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._ready or self._run is not None)

    @property
    def running(self) -> int:
        return self._run.size if self._run is not None else 0

    @torch.inference_mode()
    def step(self) -> list:
        """Pick every running row's next token (finished rows leave), glimpse waiting rows while
        slots are free, admit ready rows into the free slots (their first token picked from their
        prefill logits), then one decode step for the whole batch: a slot freed in a step is filled
        in the same step."""
        self._run, finished = self._pick(self._run)
        free = self.config.max_rows - self.running
        while self._waiting and free > 0 and len(self._ready) < free:
            self._ready.extend(self._glimpse(self._next_chunk()))
        joined, first = self._pick(self._admit(self._run, self._ready))
        finished += first
        if joined is not None:
            self._run = joined if self._run is None else self._merge(self._run, joined)
        self._run = self._decode(self._run, queued=bool(self._waiting or self._ready))
        for i, _ in finished:
            del self._requests[i]
        return finished

    def abort(self) -> dict:
        """After a failed step: drop every row that had started (in a glimpse chunk, glimpsed, or
        decoding) and return them as {index: request}; rows still waiting stay queued."""
        waiting = set(self._waiting)
        started = {i: r for i, r in self._requests.items() if i not in waiting}
        for i in started:
            del self._requests[i]
        self._ready.clear()
        self._run = self._primed = None
        self._pick_s = 0.0
        return started

    # ---- stages -----------------------------------------------------------------------------------
    def _next_chunk(self) -> list:
        """The next waiting requests, in order, up to prefill_tokens padded raw tokens and max_rows."""
        chunk, longest = [], 0
        while self._waiting:
            n = _raw_length(self._requests[self._waiting[0]])
            if chunk and ((len(chunk) + 1) * max(longest, n) > self.config.prefill_tokens or len(chunk) >= self.config.max_rows):
                break
            chunk.append(self._waiting.popleft())
            longest = max(longest, n)
        return chunk

    def _glimpse(self, chunk: list) -> list:
        engine = self.engine
        requests = [self._requests[i] for i in chunk]
        inputs = engine._check(engine._to_device(engine.build_inputs(requests)))
        t0 = _now(engine.device)
        if self._prune and inputs.pixel_values is not None:
            rules = [r.keep_rule for r in requests]
            seeds = [r.prune_seed for r in requests]
            rows = self.core.prune_stage(inputs, engine.rule, rules=rules if any(r is not None for r in rules) else None,
                                         seeds=seeds if any(x is not None for x in seeds) else None)
        else:  # every layer at full length, nothing dropped
            visual = self.core.visual_tokens(inputs)
            masks = [torch.ones(sum(v), dtype=torch.bool, device=engine.device) for v in visual]
            rows = self.core.masked_stage(inputs, masks, self.layers - 1, visual)
        seconds = _now(engine.device) - t0
        self.stats.prefill_s += seconds
        self.stats.prefill_tokens += int(inputs.attention_mask.sum())
        return [_Ready(i, row, seconds / len(chunk), request_limits([self._requests[i]], self._sampling)[0])
                for i, row in zip(chunk, rows)]

    def _admit(self, run: Optional[_Running], ready: deque) -> Optional[_Running]:
        """The ready rows that fit the KV budget next to `run` (first fit, in order), prefilled to the
        end as a batch of their own (None when none fits)."""
        if not ready:
            return None
        rows = run.size if run else 0
        widest = 0
        if run is not None:  # the widest the running rows can still grow to (the picked token not yet fed)
            widest = int((run.pad.sum(dim=1) + run.limit - run.made + 1).max())
        taken, kept = [], deque()
        for item in ready:
            future = max(widest, item.row.length + item.limit)
            fits = (rows + 1) * future * self.layers <= self.config.kv_budget_tokens
            if rows < self.config.max_rows and (fits or rows == 0):
                if not fits:
                    self.stats.rows_over_budget += 1
                taken.append(item)
                rows, widest = rows + 1, future
            else:
                kept.append(item)
        ready.clear()
        ready.extend(kept)
        if not taken:
            return None
        primed = set(self._primed.index) if self._primed is not None else set()
        parts = []
        if any(t.index in primed for t in taken):
            parts.append(self._take_primed({t.index for t in taken if t.index in primed}))
        fresh = [t for t in taken if t.index not in primed]
        if fresh:  # finish them, and a few of the next ready rows with them (`prime_rows`)
            room = min(self.config.prime_rows - len(fresh), self.config.prime_rows - 1 - len(primed))
            extra = [t for t in ready if t.index not in primed][:max(room, 0)]
            batch = fresh + extra
            t0 = _now(self.engine.device)
            state = self.core.finish_prefill([t.row for t in batch])
            seconds = _now(self.engine.device) - t0
            self.stats.prefill_s += seconds
            self.stats.finish_calls += 1
            finished = self._new_running(state, batch, seconds / len(batch))
            if extra:
                order = torch.arange(len(batch), device=self.engine.device)
                rest = self._select(finished, order[len(fresh):])
                finished = self._select(finished, order[:len(fresh)])
                self._primed = rest if self._primed is None else self._merge(self._primed, rest)
            parts.append(finished)
        self.stats.admissions += 1
        return parts[0] if len(parts) == 1 else self._merge(*parts)

    def _take_primed(self, indices: set) -> _Running:
        """The primed rows with these request indices (leaving the others primed)."""
        pool = self._primed
        take = torch.tensor([i in indices for i in pool.index], device=self.engine.device)
        self._primed = self._select(pool, (~take).nonzero().flatten()) if not bool(take.all()) else None
        return self._select(pool, take.nonzero().flatten())

    def _new_running(self, state: PrefillState, taken: list, seconds: float) -> _Running:
        device = self.engine.device
        n = len(taken)
        sampling = [row_sampling(self._sampling, self._requests[t.index].sampling, self._base_seed, t.index,
                                 self._requests[t.index].seed, device) for t in taken]
        return _Running(
            cache=state.cache, pad=state.pad_mask, next_pos=state.next_positions, logits=state.logits,
            index=[t.index for t in taken], limit=torch.tensor([t.limit for t in taken], device=device),
            made=torch.zeros(n, dtype=torch.long, device=device), sampling=sampling, tokens=[[] for _ in taken],
            prefill_s=[t.seconds + seconds for t in taken], decode_s=[0.0] * n, share=[0.0] * n, pad_acc=[0.0] * n,
            kv_acc=[0.0] * n, rows=[t.row for t in taken],
        )

    def _pick(self, run: Optional[_Running]) -> tuple[Optional[_Running], list]:
        """Select each row's next token from its pending logits; emit the rows that finish and keep
        the token of the others to feed (`feed`). Returns the survivors (None if none) and the finished
        (index, result) pairs."""
        if run is None:
            return None, []
        t0 = _now(self.engine.device)
        nxt = select_next(run.logits, run.sampling, run.tokens)  # [B]
        run.made += 1
        hit = torch.isin(nxt, self._eos)
        for slot, token in enumerate(nxt.tolist()):
            run.tokens[slot].append(token)
            stops = run.sampling[slot].params.stop
            if stops and not hit[slot] and self.engine.stop_reached(run.tokens[slot], stops):
                hit[slot] = True
        done = hit | (run.made >= run.limit)
        self.stats.output_tokens += run.size
        finished = [(run.index[s], self._result(run, s, bool(hit[s]))) for s in done.nonzero().flatten().tolist()]
        if len(finished) == run.size:
            run = None
        elif finished:
            alive = (~done).nonzero().flatten()
            run, nxt = self._select(run, alive), nxt.index_select(0, alive)
        if run is not None:
            run.feed = nxt
        self._pick_s += _now(self.engine.device) - t0
        return run, finished

    def _decode(self, run: Optional[_Running], queued: bool) -> Optional[_Running]:
        """One decode step feeding every row its picked token (`queued`: rows are waiting to join,
        for `SchedulerStats.steady_concurrency`). The step's time includes this step's picks."""
        picked, self._pick_s = self._pick_s, 0.0
        if run is None:
            self.stats.decode_s += picked
            return None
        t0 = _now(self.engine.device)
        run.pad = torch.cat([run.pad, run.pad.new_ones(run.size, 1)], dim=1)
        run.logits = self.core.decode_step(run.feed, run.next_pos, run.pad, run.cache)
        run.next_pos, run.feed = run.next_pos + 1, None
        seconds = _now(self.engine.device) - t0 + picked
        stats, size = self.stats, run.size
        stats.decode_s += seconds
        stats.decode_steps += 1
        stats.row_steps += size
        if queued:
            stats.queued_steps += 1
            stats.queued_row_steps += size
        stats.peak_rows = max(stats.peak_rows, size)
        slots, real = size * run.width * self.layers, int(run.pad.sum()) * self.layers
        stats.cache_slots += slots
        stats.cache_real += real
        pad_share, kv_share = 1.0 - real / slots, slots / self.config.kv_budget_tokens
        for slot in range(size):  # the forward fed every row one token: share its time
            run.decode_s[slot] += seconds / size
            run.share[slot] += 1.0 / size
            run.pad_acc[slot] += pad_share
            run.kv_acc[slot] += kv_share
        return run

    def _result(self, run: _Running, slot: int, finished_by_eos: bool) -> GenerationResult:
        row = run.rows[slot]
        mask = row.keep_mask if self._prune else None
        result = self.engine.row_result(
            row.visual_tokens, mask, row.importance_logits if self._prune else None, run.tokens[slot], finished_by_eos,
            row.prompt_tokens, (run.prefill_s[slot], run.decode_s[slot]), self._return_masks, run.sampling[slot].params.stop,
        )
        steps = len(run.tokens[slot]) - 1  # decoder forwards the row took part in
        result.extra.update(
            decode_share=run.share[slot],
            decode_rows=steps / run.share[slot] if steps else None,
            pad_fraction=run.pad_acc[slot] / steps if steps else None,
            kv_use=run.kv_acc[slot] / steps if steps else None,
        )
        return result

    # ---- batch surgery ------------------------------------------------------------------------------
    def _select(self, run: _Running, alive: torch.Tensor) -> _Running:
        """The running rows at `alive` (slot indices), with fully padded leading columns trimmed."""
        t0 = _now(self.engine.device)
        pad = run.pad.index_select(0, alive)
        real = pad.bool().any(dim=0)
        first = int(real.nonzero()[0]) if bool(real.any()) else 0
        keys = [compat.cache_keys(run.cache, i).index_select(0, alive)[:, :, first:] for i in range(self.layers)]
        values = [compat.cache_values(run.cache, i).index_select(0, alive)[:, :, first:] for i in range(self.layers)]
        slots = alive.tolist()
        pick = lambda xs: [xs[s] for s in slots]  # noqa: E731
        out = _Running(
            cache=self._cache(keys, values), pad=pad[:, first:], next_pos=run.next_pos.index_select(0, alive),
            logits=run.logits.index_select(0, alive), index=pick(run.index), limit=run.limit.index_select(0, alive),
            made=run.made.index_select(0, alive), sampling=pick(run.sampling),
            tokens=pick(run.tokens), prefill_s=pick(run.prefill_s), decode_s=pick(run.decode_s), share=pick(run.share),
            pad_acc=pick(run.pad_acc), kv_acc=pick(run.kv_acc), rows=pick(run.rows),
            feed=run.feed.index_select(0, alive) if run.feed is not None else None,
        )
        self.stats.surgery_s += _now(self.engine.device) - t0
        return out

    def _merge(self, a: _Running, b: _Running) -> _Running:
        """One batch of both, left-padded to the wider."""
        t0 = _now(self.engine.device)
        width = max(a.width, b.width)
        keys, values = [], []
        for i in range(self.layers):
            keys.append(torch.cat([_pad_left(compat.cache_keys(x.cache, i), width, 2) for x in (a, b)]))
            values.append(torch.cat([_pad_left(compat.cache_values(x.cache, i), width, 2) for x in (a, b)]))
        out = _Running(
            cache=self._cache(keys, values), pad=torch.cat([_pad_left(a.pad, width, 1), _pad_left(b.pad, width, 1)]),
            next_pos=torch.cat([a.next_pos, b.next_pos]), logits=torch.cat([a.logits, b.logits]),
            index=a.index + b.index, limit=torch.cat([a.limit, b.limit]), made=torch.cat([a.made, b.made]),
            sampling=a.sampling + b.sampling, tokens=a.tokens + b.tokens,
            prefill_s=a.prefill_s + b.prefill_s, decode_s=a.decode_s + b.decode_s, share=a.share + b.share,
            pad_acc=a.pad_acc + b.pad_acc, kv_acc=a.kv_acc + b.kv_acc, rows=a.rows + b.rows,
            feed=torch.cat([a.feed, b.feed]) if a.feed is not None and b.feed is not None else None,
        )
        self.stats.surgery_s += _now(self.engine.device) - t0
        return out

    def _cache(self, keys: list, values: list):
        from transformers import DynamicCache

        cache = DynamicCache(config=compat.text_config(self.engine.model))
        for i, (k, v) in enumerate(zip(keys, values)):
            cache.update(k, v, i)
        return cache


def cache_bytes_per_token(model) -> int:
    """Bytes one token takes in one layer's KV cache (keys and values)."""
    text = compat.text_config(model)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * kv_heads * head_dim * element


def default_kv_budget(model, fraction: float) -> tuple[int, str]:
    """KV budget (cache tokens across all layers) from the device's free memory: `fraction` of what is
    free now (after the model is loaded), like vLLM's gpu_memory_utilization; on CPU, of the memory
    available to new allocations. Returns (tokens, where the figure came from)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        source = f"{free / 2**30:.1f} GiB free on {device}"
    else:
        import psutil

        free = psutil.virtual_memory().available
        source = f"{free / 2**30:.1f} GiB of host memory available"
    return max(1, int(free * fraction) // cache_bytes_per_token(model)), source


def _raw_length(req: GenerationRequest) -> int:
    """Prompt tokens estimate (chars / 3) plus the visual tokens the request states."""
    return len(req.prompt or "") // 3 + int(req.visual_tokens or 0) + 16


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
