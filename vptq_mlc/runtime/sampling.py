"""Per-request sampling on the host in numpy, with Hugging Face `generate` semantics.

Order (as in transformers): repetition penalty over every token seen so far (prompt + output), then the
OpenAI presence/frequency penalties over the generated tokens, then temperature, top-k, top-p, softmax,
one draw. Temperature 0 is greedy (argmax after the penalty). Each
request owns a `np.random.Generator`, so a seeded request is reproducible whatever else is in the batch.
Stop strings are matched on the decoded text; `StopStrings` holds back text that may be the start of one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vptq_mlc.errors import GenerationError


@dataclass
class SamplingParams:
    """What one request asks for. top_k 0 and top_p 1.0 mean "off"."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (all(s for s in self.stop), "stop strings must not be empty"),
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


def process_logits(logits: np.ndarray, params: SamplingParams, seen: np.ndarray,
                   generated: np.ndarray | None = None) -> np.ndarray:
    """Penalised, tempered and filtered float64 scores (-inf = excluded); temperature 0 skips the warpers.

    `seen`: prompt + generated ids (repetition penalty); `generated`: the output ids only (OpenAI penalties).
    """
    scores = apply_repetition_penalty(logits.astype(np.float64), seen, params.repetition_penalty)
    if generated is not None:
        scores = apply_presence_frequency(scores, generated, params.presence_penalty, params.frequency_penalty)
    if params.temperature == 0:
        return scores
    scores = scores / params.temperature
    return filter_top_p(filter_top_k(scores, params.top_k), params.top_p)


class Sampler:
    """One request's sampler: its parameters and its random generator."""

    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray, seen: np.ndarray, generated: np.ndarray | None = None) -> int:
        """Next token from one row of logits given the ids seen so far (prompt + generated) and the generated."""
        scores = process_logits(logits, self.params, seen, generated)
        if self.params.temperature == 0:
            return int(np.argmax(scores))
        probs = softmax(scores)
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), probs.size - 1))


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
