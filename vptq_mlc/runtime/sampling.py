"""Per-request sampling on the host in numpy, with Hugging Face `generate` semantics.

Order: a token constraint's mask (structured output) and `logit_bias` on the raw logits, then (as in
transformers) the repetition penalty over every token seen so far (prompt + output), the OpenAI
presence/frequency penalties over the generated tokens, temperature, top-k, top-p, min-p, softmax, one draw.
Temperature 0 (or below `GREEDY_BELOW_TEMPERATURE`) is greedy (argmax after the penalties). Logprobs are the
log-softmax of the scores after the penalties and temperature and before top-k/top-p/min-p, as OpenAI and vLLM
report them. Each request owns a `np.random.Generator`, so a seeded request is reproducible whatever else is in
the batch. Stop strings are matched on the decoded text; `StopStrings` holds back text that may be the start of
one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vptq_mlc.errors import GenerationError

MAX_TOP_LOGPROBS = 20
# Temperatures below this are greedy (as in vLLM): the distribution is already the argmax's for any logit gap above
# ~1e-4, and dividing float32 logits by a smaller one overflows them to infinities (the compiled sampler's scores).
GREEDY_BELOW_TEMPERATURE = 1e-5
# The repetition penalty divides or multiplies a float32 logit: beyond this range the result overflows or flushes
# to zero, and no model's logits need more.
REPETITION_PENALTY_RANGE = (1e-6, 1e6)


@dataclass
class SamplingParams:
    """What one request asks for. top_k 0 and top_p 1.0 mean "off".

    Validated once, when built (`__post_init__`): a SamplingParams that exists is a valid one, so the engine, the
    samplers and a Ray replica receiving it (unpickled, not rebuilt) never check it again."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    logprobs: bool = False  # record each chosen token's logprob
    top_logprobs: int = 0  # and this many most likely alternatives (0..MAX_TOP_LOGPROBS)

    def __post_init__(self) -> None:
        self.validate()
        if self.temperature < GREEDY_BELOW_TEMPERATURE:
            self.temperature = 0.0

    def validate(self) -> None:
        """Raise GenerationError naming the first field out of range (with the range)."""
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (REPETITION_PENALTY_RANGE[0] <= self.repetition_penalty <= REPETITION_PENALTY_RANGE[1],
             f"repetition_penalty must be in [{REPETITION_PENALTY_RANGE[0]:g}, {REPETITION_PENALTY_RANGE[1]:g}] "
             f"(1 = off), got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1] (0 = off), got {self.min_p}"),
            (self.seed is None or 0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}"),
            (all(s for s in self.stop), "stop strings must not be empty"),
            (all(-100 <= b <= 100 for b in self.logit_bias.values()), "logit_bias values must be in [-100, 100]"),
            (all(t >= 0 for t in self.logit_bias), "logit_bias keys must be token ids >= 0"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(message)


def apply_repetition_penalty(scores: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF rule: a seen token's logit is divided by `penalty` if positive, multiplied if negative."""
    if penalty == 1.0 or seen.size == 0:
        return scores
    ids = np.unique(seen)
    picked = scores[ids]
    scores = scores.copy()
    scores[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return scores


def apply_presence_frequency(scores: np.ndarray, generated: np.ndarray, presence: float,
                             frequency: float) -> np.ndarray:
    """OpenAI rule: logit -= count * frequency + (count > 0) * presence, counting generated tokens only."""
    if (presence == 0 and frequency == 0) or generated.size == 0:
        return scores
    ids, counts = np.unique(generated, return_counts=True)
    scores = scores.copy()
    scores[ids] -= counts * frequency + presence
    return scores


def filter_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep logits >= the k-th largest (ties at the boundary stay, as in transformers)."""
    if k <= 0 or k >= scores.size:
        return scores
    kth = np.partition(scores, -k)[-k]
    return np.where(scores < kth, -np.inf, scores)


def filter_top_p(scores: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: drop the least likely tokens whose total probability is <= 1 - p; keep at least one."""
    if p >= 1.0:
        return scores
    order = np.argsort(scores, kind="stable")  # ascending, like transformers
    probs = softmax(scores[order])
    remove = np.cumsum(probs) <= (1.0 - p)
    remove[-1] = False
    out = scores.copy()
    out[order[remove]] = -np.inf
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - np.max(x))
    return e / e.sum()


def filter_min_p(scores: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below `min_p` times the most likely token's."""
    if min_p <= 0:
        return scores
    probs = softmax(scores)
    return np.where(probs < min_p * probs.max(), -np.inf, scores)


def apply_logit_bias(scores: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    """OpenAI `logit_bias`: add each token's bias to its logit (ids past the vocabulary are ignored)."""
    if not bias:
        return scores
    ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
    vals = np.fromiter(bias.values(), dtype=np.float64, count=len(bias))
    keep = ids < scores.size
    scores = scores.copy()
    np.add.at(scores, ids[keep], vals[keep])
    return scores


def bitmask_allows(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Bool [vocab] from an xgrammar-layout bitmask: int32 words, bit i of word j allows token 32*j + i."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask, dtype="<i4").view(np.uint8), bitorder="little")
    return bits[:vocab_size].astype(bool)


def penalized_scores(logits: np.ndarray, params: SamplingParams, seen: np.ndarray,
                     generated: np.ndarray | None = None, bitmask: np.ndarray | None = None) -> np.ndarray:
    """float64 scores after the constraint mask, logit_bias, penalties and temperature (before any filter).

    `seen`: prompt + generated ids (repetition penalty); `generated`: the output ids only (OpenAI penalties).
    `bitmask`: a token constraint's allowed tokens (`bitmask_allows` layout); disallowed tokens get -inf.
    """
    scores = apply_logit_bias(logits.astype(np.float64), params.logit_bias)
    if bitmask is not None:
        scores = np.where(bitmask_allows(bitmask, scores.size), scores, -np.inf)
    scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    if generated is not None:
        scores = apply_presence_frequency(scores, generated, params.presence_penalty, params.frequency_penalty)
    return scores if params.temperature == 0 else scores / params.temperature


def process_logits(logits: np.ndarray, params: SamplingParams, seen: np.ndarray,
                   generated: np.ndarray | None = None, bitmask: np.ndarray | None = None) -> np.ndarray:
    """Penalised, tempered and filtered float64 scores (-inf = excluded); temperature 0 skips the warpers."""
    scores = penalized_scores(logits, params, seen, generated, bitmask)
    if params.temperature == 0:
        return scores
    return filter_min_p(filter_top_p(filter_top_k(scores, params.top_k), params.top_p), params.min_p)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x)
    return x - m - np.log(np.sum(np.exp(x - m)))


@dataclass
class TokenLogprob:
    """A chosen token's logprob and the `top` most likely (token, logprob) pairs of its step, best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprob(scores: np.ndarray, token: int, top_n: int) -> TokenLogprob:
    """Logprobs from `penalized_scores` (log-softmax; ties in the top list go to the lower token id)."""
    lp = log_softmax(scores)
    top = np.argsort(-lp, kind="stable")[:top_n] if top_n else np.empty(0, dtype=np.int64)
    return TokenLogprob(int(token), float(lp[token]), [(int(t), float(lp[t])) for t in top])


class TokenConstraint(Protocol):
    """What structured output (a grammar matcher) offers the sampler, step by step."""

    def fill_bitmask(self, bitmask: np.ndarray) -> None:
        """Write the tokens allowed next into an int32 [ceil(vocab / 32)] bitmask (`bitmask_allows` layout)."""

    def accept(self, token: int) -> None:
        """Advance past the sampled token."""

    def is_terminated(self) -> bool:
        """True once the constrained output is complete (the request then stops)."""


class Sampler:
    """One request's sampler: its parameters and its random generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray, seen: np.ndarray, generated: np.ndarray | None = None,
               bitmask: np.ndarray | None = None) -> int:
        """Next token from one row of logits given the ids seen so far (prompt + generated) and the generated."""
        return self.sample_with_logprob(logits, seen, generated, bitmask)[0]

    def sample_with_logprob(self, logits: np.ndarray, seen: np.ndarray, generated: np.ndarray | None = None,
                            bitmask: np.ndarray | None = None) -> tuple[int, TokenLogprob | None]:
        """`sample`, plus the chosen token's logprob when the request asked for logprobs."""
        base = penalized_scores(logits, self.params, seen, generated, bitmask)
        if self.params.temperature == 0:
            token = int(np.argmax(base))
        else:
            p = self.params
            probs = softmax(filter_min_p(filter_top_p(filter_top_k(base, p.top_k), p.top_p), p.min_p))
            cdf = np.cumsum(probs)
            token = int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), probs.size - 1))
        logprob = token_logprob(base, token, self.params.top_logprobs) if self.params.logprobs else None
        return token, logprob


class StopStrings:
    """Cut generated text at the first stop string; while streaming, hold back a possible partial match."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = list(stops)
        self.text = ""  # everything decoded so far
        self.emitted = 0  # how much of `text` was released
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add decoded text; return what can be released now. Sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        self.text += delta
        if not self.stops:
            return self._release(len(self.text))
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        hold = 0  # longest tail of text that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text) - self.emitted), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return self._release(len(self.text) - hold)

    def flush(self) -> str:
        """At the end of generation the held-back tail is plain text."""
        return "" if self.stopped else self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return out
