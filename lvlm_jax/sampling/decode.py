"""Autoregressive decoding: one prefill into a static KV cache, then a `lax.while_loop` of steps.

Greedy, temperature, top-k and top-p sampling, min/max new tokens, stop tokens and stop strings,
with transformers' `generate` semantics: the same logit processors in the same order, finished
rows padded. Prompts may be padded on either side (left padding is usual); every row continues
after its own last real token. `decode` is the jitted pure function (one compilation per model
structure, batch size, prompt length and config); `generate` splits an NNX model and calls it.
`prefill` and `decode_step` are the cache code that beam search shares.
"""

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.models.llm import LLM, KVCache, default_positions
from lvlm_jax.models.lvlm import LVLM
from lvlm_jax.sampling.stop_strings import StopStrings


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How `decode` picks tokens and when it stops. Static under jit: each config compiles once."""
  max_new_tokens: int = help_field(128, "Most tokens generated per row; sets "
                                   "the output and KV-cache size.")
  min_new_tokens: int = help_field(0, "Stop tokens are suppressed until a row has this many new "
                                   "tokens (stop strings still end a row, as in transformers).")
  do_sample: bool = help_field(False, "Sample from the (warped) distribution; "
                               "False is greedy decoding.")
  temperature: float = help_field(1.0, "Logits are divided by this before sampling (> 0).")
  top_k: int = help_field(0, "Sample only among the k most likely tokens (ties kept); 0 disables.")
  top_p: float = help_field(1.0, "Nucleus sampling: keep the smallest set of most likely tokens "
                            "whose probability reaches top_p; 1.0 disables.")
  eos_token_ids: tuple[int, ...] = help_field((), "Token ids that end a row (kept in the output).")
  pad_token_id: int = help_field(0, "Token written after a row has ended.")
  num_return_sequences: int = help_field(
      1, "Samples per prompt (sampling only). Each prompt is prefilled once and its KV cache "
      "copied; output row i * k + j is sample j of prompt i, as in transformers.")

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
    if not 0 <= self.min_new_tokens <= self.max_new_tokens:
      raise UserError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got "
                      f"{self.min_new_tokens}")
    if self.do_sample and not self.temperature > 0:
      raise UserError(f"temperature must be > 0 when sampling, got {self.temperature}")
    if self.top_k < 0:
      raise UserError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.num_return_sequences < 1:
      raise UserError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
    if self.num_return_sequences > 1 and not self.do_sample:
      raise UserError("num_return_sequences > 1 needs do_sample=True: greedy decoding would "
                      "return the same sequence k times")
    object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))


class Generation(NamedTuple):
  """tokens: int32 [B, N], pad_token_id after each row's end. logprobs: float32 [B, N], log p(token)
  under the model's unmodified distribution (no temperature or filtering), 0 after the end.
  lengths: int32 [B], new tokens per row including the stop token. stopped: bool [B], the row ended
  on a stop token or stop string (False: it ran into max_new_tokens)."""
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  stopped: jax.Array


def language_model(model: LLM | LVLM) -> LLM:
  """The decoder that holds the KV cache: the model itself, or a LVLM's LLM."""
  return model.llm if isinstance(model, LVLM) else model


class Prefix(NamedTuple):
  """What decoding continues from: the KV cache of everything fed so far (prompt, images and any
  extension), computed once. logits: float32 [B, V] after each row's last fed token; cache;
  positions: int32 [B], the position of the next token. Rows can be copied (`branch`) and
  extended with more tokens (`extend`) without feeding the prompt again."""
  logits: jax.Array
  cache: KVCache
  positions: jax.Array


def prefill(model: LLM | LVLM, input_ids: jax.Array, attention_mask: jax.Array, cache_size: int,
            pixel_values: jax.Array | None = None, copies: int = 1) -> Prefix:
  """Runs the prompts into a fresh cache of `cache_size` slots.

  input_ids, attention_mask: int [B, T]; pixel_values: float32 [B, N, H, W, 3] for a LVLM.
  copies: rows per prompt in the result (samples or beams of one prompt), row i * copies + j a copy
  of prompt i's: each prompt runs once.
  """
  positions = default_positions(input_ids, None, attention_mask)
  lm = language_model(model)
  cache = KVCache.empty(lm.config, input_ids.shape[0], cache_size)
  rope = None
  if isinstance(model, LVLM):
    embeds = model.embed(input_ids, pixel_values)
    rope, offsets = model.rope_positions(input_ids, attention_mask, pixel_values)
    if offsets is not None:
      cache = cache._replace(rope_offsets=offsets)
  else:
    embeds = model.embed(input_ids)
  hidden, cache = lm.hidden(embeds, positions, cache, rope)
  last = jnp.argmax(positions, axis=1)  # the last real token, wherever the padding is
  last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
  return branch(Prefix(lm.logits(last_hidden)[:, 0], cache, jnp.max(positions, axis=1) + 1),
                copies)


def branch(prefix: Prefix, copies: int) -> Prefix:
  """Each row `copies` times, row i * copies + j a copy of row i (the cache's slot index is
  shared by all rows and stays)."""
  if copies == 1:
    return prefix
  return jax.tree.map(lambda x: jnp.repeat(x, copies, axis=0) if x.ndim else x, prefix)


def extend(model: LLM | LVLM, prefix: Prefix, tokens: jax.Array, mask: jax.Array) -> Prefix:
  """Feeds more text after each row: tokens, mask int [B, E] (padding anywhere; a row may add
  nothing). The cache needs E free slots. Equal to prefilling prompt + extension afresh."""
  lm = language_model(model)
  positions = jnp.where(mask > 0, prefix.positions[:, None] + jnp.cumsum(mask, axis=1) - 1, -1)
  hidden, cache = lm.hidden(lm.embed(tokens), positions.astype(jnp.int32), prefix.cache)
  last = jnp.argmax(positions, axis=1)
  logits = lm.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1))[:, 0]
  grew = jnp.any(mask > 0, axis=1)
  return Prefix(jnp.where(grew[:, None], logits, prefix.logits), cache,
                prefix.positions + jnp.sum(mask > 0, axis=1).astype(jnp.int32))


def decode_step(model: LLM | LVLM, tokens: jax.Array, positions: jax.Array,
                cache: KVCache) -> tuple[jax.Array, KVCache]:
  """Feeds one new token per row. tokens, positions: int [B] -> (logits float32 [B, V], cache).

  Generated tokens are text: a LVLM embeds them with its LLM (as transformers does after prefill).
  """
  lm = language_model(model)
  hidden, cache = lm.hidden(lm.embed(tokens[:, None]), positions[:, None], cache)
  return lm.logits(hidden)[:, 0], cache


def suppress_stop_tokens(scores: jax.Array, step: jax.Array, min_new_tokens: int,
                         eos_token_ids: tuple[int, ...]) -> jax.Array:
  """scores [..., V]: stop tokens -> -inf while fewer than `min_new_tokens` tokens exist."""
  if not min_new_tokens or not eos_token_ids:
    return scores
  ids = jnp.asarray(eos_token_ids)
  blocked = scores.at[..., ids].set(-jnp.inf)
  return jnp.where(step < min_new_tokens, blocked, scores)


def first_argmax(x: jax.Array) -> jax.Array:
  """[B, V] -> int32 [B]: jnp.argmax (the first maximum, or the first NaN) as a max and a min, two
  plain reductions; XLA:CPU runs argmax's value-and-index reduction over a 32k vocabulary about
  2x slower."""
  top = jnp.max(x, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where((x == top) | jnp.isnan(x), index, x.shape[-1]), axis=-1)


def _order_keys(logits: jax.Array) -> jax.Array:
  """uint32 keys ordered as the float32 logits are (-inf lowest), for bisection over values."""
  bits = jax.lax.bitcast_convert_type(logits.astype(jnp.float32), jnp.uint32)
  negative = bits >= jnp.uint32(0x80000000)
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _bisect_keys(keys: jax.Array, goes_up: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """[B, V] keys -> [B, 1]: the smallest key t in [min, max] of its row with goes_up(t) true,
  where goes_up([B, 1] keys) -> [B, 1] bool is monotone (false, then true) and true at the max.
  32 halvings of the uint32 range, each one pass over the row: no sort. (On a CPU, XLA runs
  lax.top_k and jnp.sort of a 32k vocabulary as a full single-threaded sort per row and step,
  which was half of the sampling time.)"""
  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    up = goes_up(mid)
    return jnp.where(up, lo, mid + 1), jnp.where(up, mid, hi)
  bounds = (jnp.min(keys, axis=-1, keepdims=True), jnp.max(keys, axis=-1, keepdims=True))
  return jax.lax.fori_loop(0, 32, halve, bounds)[1]


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """[B, V]: logits below the k-th largest -> -inf, its ties kept (transformers'
  TopKLogitsWarper)."""
  keys = _order_keys(logits)
  # The k-th largest value is the smallest t with fewer than k values above it.
  kth = _bisect_keys(keys, lambda t: jnp.sum(keys > t, axis=-1, keepdims=True) < k)
  return jnp.where(keys < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """[B, V]: keeps the most likely tokens until their probability reaches p (at least one; tokens
  tied with the last one kept are kept too), as transformers' TopPLogitsWarper does: a token is
  dropped when the more likely tokens already hold p of the mass."""
  keys = _order_keys(logits)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  # The least likely token kept is the smallest t whose strictly more likely tokens hold < p.
  lowest_kept = _bisect_keys(
      keys, lambda t: jnp.sum(jnp.where(keys > t, probs, 0.0), axis=-1, keepdims=True) < p)
  return jnp.where(keys < lowest_kept, -jnp.inf, logits)


def warp(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """Temperature, then top-k, then top-p, as transformers orders its warpers. [B, V] -> [B, V]."""
  if config.temperature != 1.0:
    logits = logits / config.temperature
  if config.top_k:
    logits = top_k_filter(logits, config.top_k)
  if config.top_p < 1.0:
    logits = top_p_filter(logits, config.top_p)
  return logits


class _State(NamedTuple):
  step: jax.Array        # int32 [], tokens chosen so far
  tokens: jax.Array      # int32 [B, N]
  logprobs: jax.Array    # float32 [B, N]
  lengths: jax.Array     # int32 [B]
  done: jax.Array        # bool [B]
  stopped: jax.Array     # bool [B]
  positions: jax.Array   # int32 [B], position of the next token to feed
  match: jax.Array       # int32 [B], stop-string automaton state
  cache: KVCache


def _choose(state: _State, logits: jax.Array, rng: jax.Array, stop: StopStrings | None,
            config: SamplingConfig) -> _State:
  """Picks token `state.step` of every row from its logits [B, V] and records it."""
  step = state.step
  scores = suppress_stop_tokens(logits, step, config.min_new_tokens, config.eos_token_ids)
  if config.do_sample:
    noise = jax.random.gumbel(jax.random.fold_in(rng, step), scores.shape, jnp.float32)
    token = first_argmax(warp(scores, config) + noise)  # the Gumbel-max draw categorical makes
  else:
    token = first_argmax(scores)
  token = jnp.where(state.done, config.pad_token_id, token).astype(jnp.int32)
  logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
  logprob = jnp.where(state.done, 0.0, logprob)
  hit = jnp.isin(token, jnp.asarray(config.eos_token_ids, jnp.int32))
  match = state.match
  if stop is not None:
    hit = hit | stop.hits[match, token]
    match = stop.transitions[match, token]
  stopped = state.stopped | (~state.done & hit)
  return state._replace(
      step=step + 1,
      tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], step, axis=1),
      logprobs=jax.lax.dynamic_update_slice_in_dim(state.logprobs, logprob[:, None], step, axis=1),
      lengths=state.lengths + (~state.done).astype(jnp.int32),
      done=state.done | hit | (step + 1 >= config.max_new_tokens),
      stopped=stopped,
      match=match)


def _decode_loop(model: LLM | LVLM, prefix: Prefix, config: SamplingConfig, rng: jax.Array | None,
                 stop: StopStrings | None) -> Generation:
  """Up to `config.max_new_tokens` tokens after every row of `prefix` (whose cache has room)."""
  if config.do_sample and rng is None:
    raise UserError("sampling (do_sample=True) needs a key: pass rng=jax.random.key(seed), a new "
                    "one (or jax.random.fold_in of one) per call for different samples")
  n = config.max_new_tokens
  batch = prefix.logits.shape[0]
  rng = jax.random.key(0) if rng is None else rng  # greedy decoding never draws from it
  loop = _State(step=jnp.zeros((), jnp.int32),
                tokens=jnp.full((batch, n), config.pad_token_id, jnp.int32),
                logprobs=jnp.zeros((batch, n), jnp.float32),
                lengths=jnp.zeros((batch,), jnp.int32),
                done=jnp.zeros((batch,), bool),
                stopped=jnp.zeros((batch,), bool),
                positions=prefix.positions,
                match=jnp.zeros((batch,), jnp.int32),
                cache=prefix.cache)
  loop = _choose(loop, prefix.logits, rng, stop, config)

  def running(loop: _State):
    return (loop.step < n) & ~jnp.all(loop.done)

  def step(loop: _State):
    last = jax.lax.dynamic_index_in_dim(loop.tokens, loop.step - 1, axis=1, keepdims=False)
    logits, cache = decode_step(model, last, loop.positions, loop.cache)
    loop = loop._replace(cache=cache, positions=loop.positions + 1)
    return _choose(loop, logits, rng, stop, config)

  loop = jax.lax.while_loop(running, step, loop)
  return Generation(loop.tokens, loop.logprobs, loop.lengths, loop.stopped)


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def decode(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
           attention_mask: jax.Array, *, config: SamplingConfig,
           pixel_values: jax.Array | None = None, rng: jax.Array | None = None,
           stop: StopStrings | None = None) -> Generation:
  """Generates up to `config.max_new_tokens` tokens after each prompt.

  graphdef, state: `nnx.split` of an LLM or LVLM. input_ids, attention_mask: int [B, T];
  pixel_values: float32 [B, N, H, W, 3] (LVLM); rng: a key, required when sampling (a `UserError`
  without one: a fixed default key would make every call return the same "samples"), unused by
  greedy decoding; stop: stop strings for this model's vocabulary. Returns a `Generation` of
  B * config.num_return_sequences rows with N = max_new_tokens.
  """
  model = nnx.merge(graphdef, state)
  model.eval()  # no dropout; this is the traced copy, the caller's model is untouched
  prefix = prefill(model, input_ids, attention_mask, input_ids.shape[1] + config.max_new_tokens,
                   pixel_values, copies=config.num_return_sequences)
  return _decode_loop(model, prefix, config, rng, stop)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_size", "copies"))
def start(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
          attention_mask: jax.Array, *, cache_size: int, pixel_values: jax.Array | None = None,
          copies: int = 1) -> Prefix:
  """`prefill` jitted for an `nnx.split` model: a prefix to branch, extend and decode from."""
  model = nnx.merge(graphdef, state)
  model.eval()
  return prefill(model, input_ids, attention_mask, cache_size, pixel_values, copies)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def extend_prefix(graphdef: nnx.GraphDef, state: nnx.State, prefix: Prefix, tokens: jax.Array,
                  mask: jax.Array) -> Prefix:
  """`extend` jitted for an `nnx.split` model."""
  model = nnx.merge(graphdef, state)
  model.eval()
  return extend(model, prefix, tokens, mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def decode_from(graphdef: nnx.GraphDef, state: nnx.State, prefix: Prefix, *,
                config: SamplingConfig, rng: jax.Array | None = None,
                stop: StopStrings | None = None) -> Generation:
  """`decode` after a prefix (its cache must have max_new_tokens free slots); one row per
  prefix row (`branch` it first for several samples per row). rng: as `decode`'s."""
  if config.num_return_sequences != 1:
    raise ValueError("decode_from: branch the prefix instead of num_return_sequences")
  model = nnx.merge(graphdef, state)
  model.eval()
  return _decode_loop(model, prefix, config, rng, stop)


def generate(model: LLM | LVLM, input_ids, attention_mask=None, *, config: SamplingConfig,
             pixel_values=None, rng: jax.Array | None = None,
             stop: StopStrings | None = None) -> Generation:
  """`decode` for an NNX model. input_ids: int [B, T] (attention_mask defaults to all ones)."""
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  if pixel_values is not None and not isinstance(model, LVLM):
    raise UserError("pixel_values were given to a text-only model")
  vocab = language_model(model).config.vocab_size
  if stop is not None and stop.transitions.shape[1] != vocab:
    raise ValueError(f"stop strings built for {stop.transitions.shape[1]} tokens, the model "
                     f"has {vocab}")
  graphdef, state = nnx.split(model)
  return decode(graphdef, state, input_ids, jnp.asarray(attention_mask, jnp.int32), config=config,
                pixel_values=pixel_values, rng=rng, stop=stop)
