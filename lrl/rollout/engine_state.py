"""The native engine's bookkeeping: what it writes per row, the live rows' decoding state, and its statistics.

Rows are numbered in request order (prompt i, sample j → row i·G + j); the engine's live rows are any subset of
them, in the order the KV cache holds them (row k of every `_LiveRows` tensor is row k of the cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class RolloutStats:
    """What one `NativeEngine.generate` call did: per engine iteration and in total.

    Per iteration (one batched forward each): ``rows`` in the forward, KV ``pages_used`` after it, and, with
    ``NativeEngine(record_tokens=True)``, ``tokens_held``: the KV slots the live rows hold at that moment (a
    prompt's shared full blocks counted once), the content the pages are paid for.
    """

    page_size: int
    page_bytes: int  # one page over all layers, K and V
    pool_pages: int  # allocatable pages (the budget)
    max_rows: int
    rows: list[int] = field(default_factory=list)
    pages_used: list[int] = field(default_factory=list)
    tokens_held: list[int] = field(default_factory=list)
    prefills: int = 0  # admission forwards (not counted as denoising steps)
    preempted_rows: int = 0  # rows restarted because the pool ran out (their samples do not change)
    partial_admissions: int = 0  # groups admitted in parts (rows or pages for only some of their samples)
    admitted_at: list[int] = field(default_factory=list)  # iteration of each admission

    @property
    def peak_pages(self) -> int:
        return max(self.pages_used, default=0)

    @property
    def peak_kv_bytes(self) -> int:
        return self.peak_pages * self.page_bytes

    def as_dict(self) -> dict:
        return dict(page_size=self.page_size, page_bytes=self.page_bytes, pool_pages=self.pool_pages,
                    max_rows=self.max_rows, iterations=len(self.rows), prefills=self.prefills,
                    preempted_rows=self.preempted_rows, partial_admissions=self.partial_admissions,
                    peak_pages=self.peak_pages, peak_kv_bytes=self.peak_kv_bytes,
                    rows=self.rows, pages_used=self.pages_used, tokens_held=self.tokens_held,
                    admitted_at=self.admitted_at)


@dataclass
class _Outputs:
    """What the loop writes for every row of the request (finished or not)."""

    tokens: torch.Tensor  # (N, slots) prompt, then generated ids as their blocks complete (pad elsewhere)
    step_map: torch.Tensor  # (N, slots) step id of each generated position
    logp: torch.Tensor  # (N, slots) float, sampling log-prob of each generated position
    plen: torch.Tensor  # (N,) prompt length
    end: torch.Tensor  # (N,) exclusive end of the returned response
    stores: torch.Tensor  # (N,) store passes
    finish: list[str]  # "stop" or "length"
    plan_lp: torch.Tensor | None = None  # (N, slots) planner rollouts: decision log-prob of step s at s - 1

    @classmethod
    def start(cls, prompts: list[list[int]], g: int, slots: int, max_new: int, pad_id: int, dev,
              planner: bool = False) -> _Outputs:
        rows = len(prompts) * g
        tokens = torch.full((rows, slots), pad_id, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            tokens[i * g : (i + 1) * g, : len(p)] = torch.tensor(p, device=dev)
        plen = torch.tensor([len(p) for p in prompts], device=dev).repeat_interleave(g)
        plan_lp = torch.zeros(rows, slots, device=dev) if planner else None
        return cls(tokens, torch.zeros_like(tokens), torch.zeros(tokens.shape, device=dev), plen, plen + max_new,
                   torch.zeros(rows, dtype=torch.long, device=dev), [""] * rows, plan_lp)

    def restart(self, rows: torch.Tensor, pad_id: int) -> None:
        """Forget what preempted ``rows`` wrote (they are decoded again from their prompt)."""
        pos = torch.arange(self.tokens.shape[1], device=rows.device)[None]
        gen = pos >= self.plen[rows, None]
        self.tokens[rows] = torch.where(gen, pad_id, self.tokens[rows])
        self.step_map[rows] = 0
        self.logp[rows] = 0.0
        self.stores[rows] = 0
        if self.plan_lp is not None:
            self.plan_lp[rows] = 0.0


@dataclass
class _LiveRows:
    """Decoding state of the rows still generating; row k of every tensor is row k of the KV cache."""

    live: torch.Tensor  # (A,) request row index (prompt i, sample j -> i·G + j)
    adm: torch.Tensor  # (A,) admission number (preemption restarts the youngest admission first)
    plen: torch.Tensor  # (A,) prompt length
    pfull: torch.Tensor  # (A,) prompt slots in shared full blocks
    budget: torch.Tensor  # (A,) first absolute position that may not be generated
    cur: torch.Tensor  # (A, B) tokens of the current block, MASK where still masked
    masked: torch.Tensor  # (A, B) bool, positions of the current block still to be generated
    step: torch.Tensor  # (A, B) step id that unmasked each position (0: prompt or still masked)
    logp: torch.Tensor  # (A, B) float, sampling log-prob of the token unmasked at each position
    steps: torch.Tensor  # (A,) denoising forwards so far
    stores: torch.Tensor  # (A,) store passes so far
    storing: torch.Tensor  # (A,) bool, the next forward is this row's store pass

    @classmethod
    def empty(cls, bsz: int, dev) -> _LiveRows:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        zb = torch.zeros(0, bsz, dtype=torch.long, device=dev)
        return cls(z, z, z, z, z, zb, zb.bool(), zb, zb.float(), z, z, z.bool())

    @classmethod
    def start(cls, rows: torch.Tensor, adm: torch.Tensor, lengths: torch.Tensor, out: _Outputs, bsz: int,
              mask_id: int) -> _LiveRows:
        """Open the first block of request rows ``rows`` (admission numbers ``adm``) at their cache ``lengths``
        (the block may hold the prompt tail)."""
        dev = out.tokens.device
        pos = lengths[:, None] + torch.arange(bsz, device=dev)
        plen, end = out.plen[rows], out.end[rows]
        masked = (pos >= plen[:, None]) & (pos < end[:, None])
        cur = torch.where(masked, mask_id, out.tokens[rows].gather(1, pos))
        zeros = torch.zeros(rows.numel(), dtype=torch.long, device=dev)
        return cls(rows, adm, plen.clone(), lengths.clone(), end.clone(), cur, masked,
                   torch.zeros_like(cur), torch.zeros(cur.shape, device=dev), zeros, zeros.clone(), zeros.bool())

    @property
    def n(self) -> int:
        return self.live.numel()

    def extend(self, other: _LiveRows) -> None:
        for f in fields(self):
            setattr(self, f.name, torch.cat([getattr(self, f.name), getattr(other, f.name)]))

    def keep(self, keep: torch.Tensor, cache) -> None:
        """Drop finished (or preempted) rows from the state and from the cache, which returns their pages."""
        idx = keep.nonzero().squeeze(1)
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[idx])
        cache.keep_rows(idx)
