"""One generation request: its prompt, sampling parameters and progress through the scheduler.

The engine moves a request through WAITING (queued) -> RUNNING (has a KV sequence; prefilling while
`prefilled < len(prompt_ids)`, then decoding) -> FINISHED. Text comes out as deltas that already respect
stop strings and incomplete UTF-8, so a server can forward them as they are.
"""

from __future__ import annotations

import enum
import itertools
import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from vptq_mlc.runtime.device_sampler import SampleRow, counter_uniform
from vptq_mlc.runtime.sampling import Sampler, SamplingParams, StopStrings, TokenConstraint, TokenLogprob
from vptq_mlc.runtime.tokenizer import StreamDecoder

_ids = itertools.count()


class TokenCounts:
    """Token ids, each with a count, in first-seen order, kept as int32 arrays that grow in place: the penalty lists a
    request hands the device sampler every step, without rebuilding them from a dict of every seen token."""

    def __init__(self, counts: dict[int, int]) -> None:
        self._index = {token: i for i, token in enumerate(counts)}
        cap = max(16, 2 * len(counts))
        self._ids = np.zeros(cap, dtype=np.int32)
        self._counts = np.zeros(cap, dtype=np.int32)
        self._ids[: len(counts)] = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        self._counts[: len(counts)] = np.fromiter(counts.values(), dtype=np.int64, count=len(counts))
        self._n = len(counts)

    def __len__(self) -> int:
        return self._n

    def set(self, token: int, count: int) -> None:
        i = self._index.get(token)
        if i is None:
            if self._n == self._ids.size:
                self._ids = np.concatenate([self._ids, np.zeros_like(self._ids)])
                self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
            i = self._index[token] = self._n
            self._ids[i] = token
            self._n += 1
        self._counts[i] = count

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, counts) views: valid until the next `set`."""
        return self._ids[: self._n], self._counts[: self._n]


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Created by `Engine.add_request`; read `output_ids`, `text`, `finish_reason`, and `pop_delta()`."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    max_new_tokens: int  # params.max_tokens capped by the context window
    detokenizer: StreamDecoder
    request_id: int = field(default_factory=lambda: next(_ids))
    state: RequestState = RequestState.WAITING
    seq_id: int | None = None
    reserved_pages: int = 0
    prefilled: int = 0
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: str | None = None  # why it ended with finish_reason "error"
    created_at: float = field(default_factory=time.perf_counter)  # perf_counter() stamps for latency stats
    first_token_at: float | None = None
    finished_at: float | None = None
    constraint: TokenConstraint | None = None  # structured output: limits the tokens allowed at each step
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output id, if params.logprobs

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)
        self._pending_logprob: TokenLogprob | None = None
        # device sampling: uniform `draws` of the counter-based stream `seed` (a random one when unseeded)
        self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.draws = 0
        self._generated_counts: dict[int, int] = {}  # output id -> how often generated (penalties)
        self._penalty_counts: TokenCounts | None = None  # the device sampler's penalty list, once asked for
        self._stops = StopStrings(self.params.stop)
        self._text: list[str] = []
        self._unread = 0

    def __repr__(self) -> str:
        return (f"Request(id={self.request_id}, {self.state.value}, prompt {self.prefilled}/{len(self.prompt_ids)}, "
                f"{len(self.output_ids)} new, finish={self.finish_reason})")

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED

    @property
    def prefill_done(self) -> bool:
        return self.prefilled >= len(self.prompt_ids)

    @property
    def text(self) -> str:
        """All text released so far (the full answer once finished)."""
        return "".join(self._text)

    def pop_delta(self) -> str:
        """Text released since the last call."""
        out = "".join(self._text[self._unread :])
        self._unread = len(self._text)
        return out

    def token_bitmask(self, vocab_size: int) -> np.ndarray | None:
        """The constraint's allowed tokens for the next step (int32 [ceil(vocab / 32)]), or None if unconstrained."""
        if self.constraint is None:
            return None
        bitmask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.constraint.fill_bitmask(bitmask)
        return bitmask

    def sample(self, logits: np.ndarray) -> int:
        """Draw the next token from this request's row of logits (penalties see prompt and output so far)."""
        generated = np.asarray(self.output_ids, dtype=np.int64)
        seen = np.concatenate([np.asarray(self.prompt_ids, dtype=np.int64), generated])
        token, self._pending_logprob = self.sampler.sample_with_logprob(
            logits, seen, generated, self.token_bitmask(logits.shape[-1]))
        return token

    def sample_row(self, vocab_size: int) -> SampleRow:
        """This step's input to the device sampler; takes the next uniform of the request's stream. Its penalty
        arrays are valid until the request's next token."""
        p = self.params
        tokens = counts = None
        if self._penalty_counts is None and (p.repetition_penalty != 1.0 or p.presence_penalty or
                                             p.frequency_penalty):
            if p.repetition_penalty != 1.0:  # every seen token, with its generated count
                table = dict.fromkeys(self.prompt_ids, 0)
                table.update(self._generated_counts)
            else:  # presence / frequency look at generated tokens only
                table = self._generated_counts
            self._penalty_counts = TokenCounts(table)
        if self._penalty_counts:
            tokens, counts = self._penalty_counts.arrays()
        row = SampleRow(p, counter_uniform(self.seed, self.draws), tokens, counts, self.token_bitmask(vocab_size))
        self.draws += 1
        return row

    def take_sample(self, token: int, logprob: TokenLogprob | None) -> int:
        """Accept a token sampled elsewhere (the device sampler); `append` it next."""
        self._pending_logprob = logprob
        return token

    def append(self, token: int) -> None:
        """Record a sampled token and decide whether the request is done (sets `finish_reason`)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.constraint is not None:
            self.constraint.accept(token)
        if token in self.stop_token_ids:
            self.finish_reason = "stop"
        else:
            self.output_ids.append(token)
            self._generated_counts[token] = self._generated_counts.get(token, 0) + 1
            if self._penalty_counts is not None:
                self._penalty_counts.set(token, self._generated_counts[token])
            if self._pending_logprob is not None:
                self.output_logprobs.append(self._pending_logprob)
                self._pending_logprob = None
            self._text.append(self._stops.feed(self.detokenizer.put(token)))
            if self._stops.stopped or (self.constraint is not None and self.constraint.is_terminated()):
                self.finish_reason = "stop"
            elif len(self.output_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
        if self.finish_reason is not None:
            self._text.append(self._stops.feed(self.detokenizer.flush()))
            self._text.append(self._stops.flush())

    def next_input(self) -> int:
        """The token a decode step feeds for this request."""
        return self.output_ids[-1]
