"""Sampling with the cache: prefill a batch of prompts, then one jitted step per token."""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.config import require_int
from nsa_jax.generation.cached_forward import prefill, step


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: list  # per prompt, its new tokens
    prefill_seconds: float  # compilation included
    decode_seconds: float  # steps after the first (which compiles)
    timed_steps: int

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second over all sequences, compilation excluded."""
        batch = len(self.tokens)
        return batch * self.timed_steps / self.decode_seconds if self.timed_steps else float("nan")


def sample(logits, key, temperature: float, top_k: int | None, num_tokens: int):
    """One token per row of logits [B, V] among ids < num_tokens: greedy when temperature is 0,
    else softmax(logits / temperature) over the top_k largest (all when None)."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) < num_tokens, logits, -jnp.inf)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return jax.random.categorical(key, logits / temperature).astype(jnp.int32)


def _check(prompts, max_new_tokens, temperature, top_k, num_tokens):
    if not prompts or any(len(p) < 1 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    require_int("max_new_tokens", max_new_tokens, 1)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and not 1 <= top_k <= num_tokens:
        raise ValueError(f"top_k must be None or in [1, {num_tokens}], got {top_k!r}")


def generate(model, prompts, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, num_tokens: int | None = None,
             implementation=None) -> Generation:
    """`max_new_tokens` tokens after each prompt (lists of token ids; lengths may differ) from
    `model` (a DecoderLM, used in place), sampling only ids < num_tokens (default: all)."""
    num_tokens = model.cfg.vocab_size if num_tokens is None else num_tokens
    _check(prompts, max_new_tokens, temperature, top_k, num_tokens)
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), lengths.max()), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    max_len = int(lengths.max()) + max_new_tokens
    graphdef, params = nnx.split(model)
    pick = jax.jit(functools.partial(sample, temperature=temperature, top_k=top_k,
                                     num_tokens=num_tokens))
    start = time.perf_counter()
    logits, state = jax.jit(lambda p, t, n: prefill(nnx.merge(graphdef, p), t, n, max_len))(
        params, tokens, lengths)
    logits = logits[np.arange(len(prompts)), lengths - 1]
    key = jax.random.key(seed)
    new = [pick(logits, jax.random.fold_in(key, 0))]
    prefill_seconds = time.perf_counter() - start
    advance = jax.jit(lambda p, s, t: step(nnx.merge(graphdef, p), s, t, implementation),
                      donate_argnums=1)
    for i in range(1, max_new_tokens):
        if i == 2:
            jax.block_until_ready(new[-1])
            start = time.perf_counter()
        logits, state = advance(params, state, new[-1])
        new.append(pick(logits, jax.random.fold_in(key, i)))
    jax.block_until_ready(new[-1])
    timed = max(max_new_tokens - 2, 0)
    out = np.stack([np.asarray(t) for t in new], axis=1)
    return Generation([row.tolist() for row in out], prefill_seconds,
                      time.perf_counter() - start if timed else 0.0, timed)
