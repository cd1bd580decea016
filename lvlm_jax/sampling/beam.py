"""Beam search and diverse (group) beam search, jitted, with transformers 5 `generate` semantics.

* `num_beam_groups == 1` follows transformers 5's vectorised `_beam_search`: each step keeps the
  top `(1 + #eos) * num_beams` continuations (at least 2 * num_beams) of all beams, finishes
  those among the top `num_beams` that end (a stop token, or max_new_tokens), continues the best
  `num_beams` unfinished ones, and stops a row once its early-stopping rule says no running beam
  can still beat its worst finished one.
* `num_beam_groups > 1` follows diverse beam search as transformers 5 runs it (the
  `transformers-community/group-beam-search` generate, i.e. transformers 4's `_group_beam_search`
  with `BeamSearchScorer`): the beams are split into groups decoded one after the other in each
  step; a group's log-probs are lowered by `diversity_penalty` times the number of times earlier
  groups chose each token at this step (Hamming diversity); each group keeps its own
  `num_beams / num_beam_groups` finished hypotheses and done flag; at the end the hypotheses of
  all groups are pooled and the best `num_return_sequences` returned.

A sequence's score (transformers' `sequences_scores`) is its summed log-probs as the search saw
them (after min-new-tokens suppression and diversity penalties) divided by
`new_tokens ** length_penalty`, where new_tokens counts the stop token. `logprobs` is the plain
summed log-probability of the new tokens under the model.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.models.llm import LLM, KVCache
from lvlm_jax.models.lvlm import LVLM
from lvlm_jax.sampling.decode import Prefix, decode_step, prefill, suppress_stop_tokens

NEG = -1.0e9  # transformers' "very large negative" score for excluded beams


@dataclasses.dataclass(frozen=True)
class BeamConfig:
  """Beam search settings, named and defaulted as in transformers' GenerationConfig (static under
  jit: each config compiles once)."""
  num_beams: int = help_field(4, "Beams kept per prompt (>= 2).")
  num_beam_groups: int = help_field(1, "Groups for diverse beam search; must divide "
                                    "num_beams. 1 is plain beam search.")
  diversity_penalty: float = help_field(0.0, "Subtracted from a group's log-prob of a token once "
                                        "per beam of an earlier group that chose it at the same "
                                        "step (> 0 with groups).")
  length_penalty: float = help_field(1.0, "Scores are summed log-probs / new_tokens ** "
                                     "length_penalty; > 0 favours longer sequences.")
  early_stopping: bool | str = help_field(
      False, "True: a prompt is done once it has num_beams finished hypotheses. False: also once "
      "no running beam can beat the worst finished one, judged at the current length "
      "(transformers' heuristic). 'never': judged at the best possible length.")
  num_return_sequences: int = help_field(1, "Hypotheses returned per prompt, "
                                         "best first (<= num_beams).")
  max_new_tokens: int = help_field(128, "Most tokens generated per hypothesis.")
  min_new_tokens: int = help_field(0, "Stop tokens are suppressed until this many tokens exist.")
  eos_token_ids: tuple[int, ...] = help_field((), "Token ids that finish a hypothesis "
                                              "(kept in it).")
  pad_token_id: int = help_field(0, "Token written after a hypothesis ends.")

  def __post_init__(self):
    object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
    if self.num_beams < 2:
      raise UserError(f"num_beams must be at least 2 for beam search, got {self.num_beams}")
    if self.num_beam_groups < 1 or self.num_beams % self.num_beam_groups:
      raise UserError(f"num_beam_groups ({self.num_beam_groups}) must divide num_beams "
                      f"({self.num_beams})")
    if self.num_beam_groups > 1 and not self.diversity_penalty > 0:
      raise UserError("diverse beam search (num_beam_groups > 1) needs diversity_penalty > 0, "
                      "otherwise every group finds the same beams")
    if self.num_beam_groups == 1 and self.diversity_penalty:
      raise UserError("diversity_penalty only acts between beam groups; set num_beam_groups > 1")
    if not 1 <= self.num_return_sequences <= self.num_beams:
      raise UserError(f"num_return_sequences must be in [1, num_beams={self.num_beams}], got "
                      f"{self.num_return_sequences}")
    if self.early_stopping not in (True, False, "never"):
      raise UserError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
    if self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
    if not 0 <= self.min_new_tokens <= self.max_new_tokens:
      raise UserError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")

  @property
  def candidates_per_beam(self) -> int:
    """Continuations kept per beam and step: enough that stop tokens cannot use them all up."""
    return max(2, 1 + len(self.eos_token_ids))


class Beams(NamedTuple):
  """Per prompt, the best hypotheses first. tokens: int32 [B, R, N] (pad after each end);
  lengths: int32 [B, R] (new tokens, the stop token included); scores: float32 [B, R]
  (transformers' sequences_scores); logprobs: float32 [B, R] (summed model log-probs)."""
  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array
  logprobs: jax.Array


class _Hypotheses(NamedTuple):
  """A fixed-size set of sequences: tokens [..., K, N], scores/logprobs/lengths [..., K]."""
  tokens: jax.Array
  scores: jax.Array
  logprobs: jax.Array
  lengths: jax.Array


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
  """Gathers along axis 1: x [B, K, ...], index int [B, J] -> [B, J, ...]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def _take_all(tree, index: jax.Array):
  return jax.tree.map(lambda x: _take(x, index), tree)


def _keep_best(hyps: _Hypotheses, k: int) -> tuple[_Hypotheses, jax.Array]:
  """The k best of [B, M] hypotheses by score, best first, and their indices [B, k]."""
  _, index = jax.lax.top_k(hyps.scores, k)
  return _take_all(hyps, index), index


def _reorder_cache(cache: KVCache, origin: jax.Array) -> KVCache:
  """cache over B*K beams; origin int [B, K]: the beam (within its prompt) each new beam extends."""
  b, k = origin.shape
  flat = (origin + jnp.arange(b)[:, None] * k).reshape(-1)
  return cache._replace(keys=tuple(x[flat] for x in cache.keys),
                        values=tuple(x[flat] for x in cache.values),
                        positions=cache.positions[flat], rope_offsets=cache.rope_offsets[flat])


def _beam_log_probs(logits: jax.Array, step: jax.Array, config: BeamConfig,
                    batch: int) -> tuple[jax.Array, jax.Array]:
  """logits [B*K, V] -> (model log-probs, log-probs the search scores), both [B, K, V]."""
  logp = jax.nn.log_softmax(logits, axis=-1).reshape(batch, config.num_beams, -1)
  return logp, suppress_stop_tokens(logp, step, config.min_new_tokens, config.eos_token_ids)


def _extend(running: _Hypotheses, logp: jax.Array, scores: jax.Array, index: jax.Array,
            step: jax.Array) -> tuple[_Hypotheses, jax.Array, jax.Array]:
  """The continuations `index` (into the flattened [K * V] of `scores` [B, K, V]) of `running`.

  Returns (continued hypotheses [B, C] with the new token written at `step`, beam of origin
  [B, C], new token [B, C]); their scores are the search scores, their length step + 1.
  """
  vocab = scores.shape[-1]
  beam, token = index // vocab, (index % vocab).astype(jnp.int32)
  tokens = _take(running.tokens, beam)
  tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[..., None], step, axis=2)
  flat = lambda x: x.reshape(x.shape[0], -1)
  extended = _Hypotheses(
      tokens=tokens,
      scores=jnp.take_along_axis(flat(scores), index, axis=1),
      logprobs=_take(running.logprobs, beam) + jnp.take_along_axis(flat(logp), index, axis=1),
      lengths=jnp.broadcast_to(step + 1, token.shape).astype(jnp.int32))
  return extended, beam, token


def _length_normalised(scores: jax.Array, length, config: BeamConfig) -> jax.Array:
  return scores / jnp.asarray(length, jnp.float32) ** config.length_penalty


def _best_possible_length(step_after: jax.Array, config: BeamConfig):
  """The length at which a running beam's score is judged by the early-stopping rule."""
  if config.early_stopping == "never" and config.length_penalty > 0:
    return config.max_new_tokens
  return step_after


class _BeamState(NamedTuple):
  step: jax.Array          # int32 [], tokens per running beam
  running: _Hypotheses     # [B, K]
  finished: _Hypotheses    # [B, K], scores length-normalised, NEG where empty
  is_finished: jax.Array   # bool [B, K], the finished slot holds a hypothesis
  improvable: jax.Array    # bool [B], a running beam may still beat a finished one
  all_ended: jax.Array     # bool [], every continuation kept at the last step ended
  positions: jax.Array     # int32 [B * K]
  cache: KVCache


def _beam_step(state: _BeamState, logits: jax.Array, config: BeamConfig) -> _BeamState:
  """One step of transformers 5's `_beam_search` on logits [B*K, V]."""
  step, k = state.step, config.num_beams
  batch = state.running.scores.shape[0]
  logp, scores = _beam_log_probs(logits, step, config, batch)
  scores = scores + state.running.scores[..., None]
  num = config.candidates_per_beam * k
  _, index = jax.lax.top_k(scores.reshape(batch, -1), num)  # best first
  cand, origin, token = _extend(state.running, logp, scores, index, step)
  ended = jnp.isin(token, jnp.asarray(config.eos_token_ids, jnp.int32)) | (
      step + 1 >= config.max_new_tokens)

  # The best K continuations that did not end go on.
  cont_scores = cand.scores + ended * NEG
  _, keep = jax.lax.top_k(cont_scores, k)
  running = _take_all(cand._replace(scores=cont_scores), keep)
  cache = _reorder_cache(state.cache, _take(origin, keep))

  # Those among the top K that ended join the finished set if they rank in its best K.
  rows_full = jnp.all(state.is_finished, axis=1, keepdims=True) & (config.early_stopping is True)
  new_finished = ended & (jnp.arange(num) < k)
  fin_scores = (_length_normalised(cand.scores, step + 1, config) + rows_full * NEG
                + (~state.improvable[:, None]) * NEG + (~new_finished) * NEG)
  merged = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), state.finished,
                        cand._replace(scores=fin_scores))
  finished, best = _keep_best(merged, k)
  is_finished = _take(jnp.concatenate([state.is_finished, new_finished], axis=1), best)

  best_running = running.scores[:, 0] / jnp.asarray(
      _best_possible_length(step + 1, config), jnp.float32) ** config.length_penalty
  worst_finished = jnp.where(is_finished, jnp.min(finished.scores, axis=1, keepdims=True), NEG)
  improvable = state.improvable & jnp.any(best_running[:, None] > worst_finished, axis=1)
  return state._replace(step=step + 1, running=running, finished=finished,
                        is_finished=is_finished, improvable=improvable, all_ended=jnp.all(ended),
                        cache=cache)


def _beam_continues(state: _BeamState, config: BeamConfig) -> jax.Array:
  all_full = jnp.all(state.is_finished) & (config.early_stopping is True)
  return jnp.any(state.improvable) & ~all_full & ~state.all_ended


class _GroupState(NamedTuple):
  step: jax.Array          # int32 []
  running: _Hypotheses     # [B, K]
  finished: _Hypotheses    # [B, G, S] per group, length-normalised scores
  is_finished: jax.Array   # bool [B, G, S]
  done: jax.Array          # bool [B, G]
  positions: jax.Array     # int32 [B * K]
  cache: KVCache


def _group_step(state: _GroupState, logits: jax.Array, config: BeamConfig) -> _GroupState:
  """One step of diverse beam search (transformers' `_group_beam_search`) on logits [B*K, V]."""
  step, k, groups = state.step, config.num_beams, config.num_beam_groups
  size = k // groups
  batch = state.running.scores.shape[0]
  logp, processed = _beam_log_probs(logits, step, config, batch)
  vocab = logp.shape[-1]
  chosen = jnp.zeros((batch, vocab), jnp.float32)  # how often earlier groups chose each token
  running, finished, is_finished, done = [], [], [], []
  origins = []
  for g in range(groups):
    part = slice(g * size, (g + 1) * size)
    group_running = jax.tree.map(lambda x: x[:, part], state.running)
    group_done = state.done[:, g]
    scores = processed[:, part] - config.diversity_penalty * chosen[:, None, :]
    scores = scores + group_running.scores[..., None]
    num = config.candidates_per_beam * size
    _, index = jax.lax.top_k(scores.reshape(batch, -1), num)  # best first
    cand, origin, token = _extend(group_running, logp[:, part], scores, index, step)
    is_eos = jnp.isin(token, jnp.asarray(config.eos_token_ids, jnp.int32))

    # Stop tokens ranked in the top `size` become hypotheses; the group keeps its best `size`.
    new = is_eos & (jnp.arange(num) < size) & ~group_done[:, None]
    held = jnp.concatenate([state.is_finished[:, g], new], axis=1)
    fresh = cand._replace(scores=_length_normalised(cand.scores, step + 1, config))
    merged = jax.tree.map(lambda a, b: jnp.concatenate([a[:, g], b], axis=1), state.finished, fresh)
    merged = merged._replace(scores=jnp.where(held, merged.scores, -jnp.inf))
    group_finished, best = _keep_best(merged, size)
    group_is_finished = _take(held, best)

    # The best `size` continuations that are not stop tokens go on; a done group emits padding.
    keep = jnp.argsort(is_eos, axis=1, stable=True)[:, :size]
    next_running = _take_all(cand, keep)
    next_origin = _take(origin, keep)
    pad = group_done[:, None]
    next_token = jnp.where(pad, config.pad_token_id, _take(token, keep))
    next_running = next_running._replace(
        tokens=jax.lax.dynamic_update_slice_in_dim(next_running.tokens, next_token[..., None], step,
                                                   axis=2),
        scores=jnp.where(pad, 0.0, next_running.scores))
    next_origin = jnp.where(pad, jnp.arange(size), next_origin)

    # transformers' BeamHypotheses.is_done, judged with the best continuation's score.
    worst = jnp.min(group_finished.scores, axis=1)
    best_possible = _length_normalised(cand.scores[:, 0], _best_possible_length(step + 1, config),
                                       config)
    full = jnp.all(group_is_finished, axis=1)
    newly_done = full if config.early_stopping is True else full & (worst >= best_possible)

    chosen = chosen + jax.nn.one_hot(next_token, vocab, dtype=jnp.float32).sum(axis=1)
    running.append(next_running)
    origins.append(next_origin + g * size)
    finished.append(group_finished)
    is_finished.append(group_is_finished)
    done.append(group_done | newly_done)

  concat = lambda *xs: jnp.concatenate(xs, axis=1)
  stack = lambda *xs: jnp.stack(xs, axis=1)
  return state._replace(step=step + 1, running=jax.tree.map(concat, *running),
                        finished=jax.tree.map(stack, *finished), is_finished=stack(*is_finished),
                        done=stack(*done), cache=_reorder_cache(state.cache, concat(*origins)))


def _group_result(state: _GroupState, config: BeamConfig) -> Beams:
  """transformers' `BeamSearchScorer.finalize`: groups not done add their running beams (at the
  current length); then all groups' hypotheses are pooled and the best returned."""
  batch, k = state.running.scores.shape
  groups = config.num_beam_groups
  size = k // groups
  running = jax.tree.map(lambda x: x.reshape(batch, groups, size, *x.shape[2:]), state.running)
  open_groups = ~state.done[:, :, None]
  running = running._replace(
      scores=jnp.where(open_groups, _length_normalised(running.scores, state.step, config),
                       -jnp.inf),
      lengths=jnp.broadcast_to(state.step, running.lengths.shape).astype(jnp.int32))
  finished = state.finished._replace(
      scores=jnp.where(state.is_finished, state.finished.scores, -jnp.inf))
  pooled = []
  for g in range(groups):
    both = jax.tree.map(lambda a, b: jnp.concatenate([a[:, g], b[:, g]], axis=1), finished, running)
    pooled.append(_keep_best(both, size)[0])
  pooled = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *pooled)
  best, _ = _keep_best(pooled, config.num_return_sequences)
  return Beams(best.tokens, best.lengths, best.scores, best.logprobs)


def _initial_running(batch: int, config: BeamConfig) -> _Hypotheses:
  """Only the first beam of each group is live at the start, so beams do not duplicate."""
  k, n = config.num_beams, config.max_new_tokens
  first = jnp.arange(k) % (k // config.num_beam_groups) == 0
  return _Hypotheses(tokens=jnp.full((batch, k, n), config.pad_token_id, jnp.int32),
                     scores=jnp.broadcast_to(jnp.where(first, 0.0, NEG), (batch, k)),
                     logprobs=jnp.zeros((batch, k), jnp.float32),
                     lengths=jnp.zeros((batch, k), jnp.int32))


def _empty(batch: int, shape: tuple[int, ...], config: BeamConfig) -> _Hypotheses:
  return _Hypotheses(tokens=jnp.full((batch, *shape, config.max_new_tokens), config.pad_token_id,
                                     jnp.int32),
                     scores=jnp.full((batch, *shape), NEG, jnp.float32),
                     logprobs=jnp.zeros((batch, *shape), jnp.float32),
                     lengths=jnp.zeros((batch, *shape), jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def beam_decode(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
                attention_mask: jax.Array, *, config: BeamConfig,
                pixel_values: jax.Array | None = None) -> Beams:
  """Beam search after each prompt. graphdef, state: `nnx.split` of an LLM or LVLM;
  input_ids, attention_mask: int [B, T]; pixel_values: float32 [B, N, H, W, 3] (LVLM).
  Returns `Beams` with R = num_return_sequences, N = max_new_tokens."""
  model = nnx.merge(graphdef, state)
  model.eval()  # no dropout; this is the traced copy, the caller's model is untouched
  # Every beam starts from the same prompt: one prefill, its rows copied.
  prefix = prefill(model, input_ids, attention_mask, input_ids.shape[1] + config.max_new_tokens,
                   pixel_values, copies=config.num_beams)
  return _search(model, prefix, config)


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def beams_from(graphdef: nnx.GraphDef, state: nnx.State, prefix: Prefix, *,
               config: BeamConfig) -> Beams:
  """Beam search after a prefix of B prompts (`decode.branch`ed num_beams times: B * K rows,
  with max_new_tokens free cache slots): a prompt already fed is not fed again."""
  model = nnx.merge(graphdef, state)
  model.eval()
  return _search(model, prefix, config)


def _search(model: LLM | LVLM, prefix: Prefix, config: BeamConfig) -> Beams:
  k = config.num_beams
  batch = prefix.logits.shape[0] // k
  logits, cache, positions = prefix

  def advance(loop):
    """Feeds every beam's newest token -> (loop, logits [B*K, V])."""
    newest = loop.running.tokens.reshape(batch * k, -1)[:, loop.step - 1]
    logits, cache = decode_step(model, newest, loop.positions, loop.cache)
    return loop._replace(cache=cache, positions=loop.positions + 1), logits

  if config.num_beam_groups == 1:
    loop = _BeamState(step=jnp.zeros((), jnp.int32), running=_initial_running(batch, config),
                      finished=_empty(batch, (k,), config), is_finished=jnp.zeros((batch, k), bool),
                      improvable=jnp.ones((batch,), bool), all_ended=jnp.zeros((), bool),
                      positions=positions, cache=cache)
    loop = _beam_step(loop, logits, config)
    loop = jax.lax.while_loop(lambda s: _beam_continues(s, config),
                              lambda s: _beam_step(*advance(s), config), loop)
    best = jax.tree.map(lambda x: x[:, :config.num_return_sequences], loop.finished)
    return Beams(best.tokens, best.lengths, best.scores, best.logprobs)

  groups, size = config.num_beam_groups, k // config.num_beam_groups
  loop = _GroupState(step=jnp.zeros((), jnp.int32), running=_initial_running(batch, config),
                     finished=_empty(batch, (groups, size), config),
                     is_finished=jnp.zeros((batch, groups, size), bool),
                     done=jnp.zeros((batch, groups), bool), positions=positions, cache=cache)
  loop = _group_step(loop, logits, config)
  loop = jax.lax.while_loop(
      lambda s: (s.step < config.max_new_tokens) & ~jnp.all(s.done),
      lambda s: _group_step(*advance(s), config), loop)
  return _group_result(loop, config)


def beam_search(model: LLM | LVLM, input_ids, attention_mask=None, *, config: BeamConfig,
                pixel_values=None) -> Beams:
  """`beam_decode` for an NNX model. input_ids: int [B, T] (attention_mask defaults to all ones)."""
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  if pixel_values is not None and not isinstance(model, LVLM):
    raise UserError("pixel_values were given to a text-only model")
  graphdef, state = nnx.split(model)
  return beam_decode(graphdef, state, input_ids, jnp.asarray(attention_mask, jnp.int32),
                     config=config, pixel_values=pixel_values)
