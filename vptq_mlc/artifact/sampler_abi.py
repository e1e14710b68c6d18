"""The argument layout of the sampling function compiled into model libraries (`sample_tokens`).

Shared by the builder (compile/sampler.py) and the engine (runtime/device_sampler.py), which must agree on it
and may not import each other. One call per step samples every row of a `[rows, vocab]` float32 logits tensor:

    sample_tokens(logits, fparams, iparams, bias_tokens, bias_values, penalty_tokens, penalty_counts, bitmask)
        -> (tokens int32[rows, 1 + MAX_TOP], logprobs float32[rows, 1 + MAX_TOP])

Column 0 of the outputs is the sampled token and its logprob, columns 1..top_n the most likely tokens and theirs.
Sparse lists (logit_bias, penalty counts) are concatenated over rows; row r owns entries [start, end). Every
list and the bitmask have at least one (unused) entry, so no tensor is empty.
"""

FUNCTION = "sample_tokens"
MAX_TOP = 20  # top logprobs a row can ask for (OpenAI's limit)

# fparams float32[rows, F_COLS]
F_TEMPERATURE, F_TOP_P, F_MIN_P, F_REPETITION, F_PRESENCE, F_FREQUENCY, F_UNIFORM = range(7)
F_COLS = 8
# iparams int32[rows, I_COLS]
I_TOP_K, I_TOP_N, I_MASK_ROW, I_VOCAB_LIMIT, I_BIAS_START, I_BIAS_END, I_PENALTY_START, I_PENALTY_END = range(8)
I_COLS = 8
# I_TOP_N: -1 = no logprobs, 0 = the chosen token's only, n = and the n most likely.
# I_MASK_ROW: the row of `bitmask` (int32[masks, ceil(vocab / 32)], xgrammar layout) constraining this row, or -1.
# I_VOCAB_LIMIT: tokens at or past it are never sampled (a model's active vocabulary).
