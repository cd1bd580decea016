"""CSR's sentence-level search tree and its calibrated rewards (METHODS.md 3.3-3.4), batched over
prompts.

Each prompt's tree starts at its root (the empty response). At every level each active node is
continued by diverse group beam search that stops at a sentence end (`sampling/sentences.py`'s
settings): its k candidates become children, scored with the parent's LM score plus the
candidate's length-normalised sequence score. A child is final when it ends the response (the
model's end token), its response reaches max_chars characters or max_response_tokens tokens, or
the tree max_sentences deep. Children failing the text hygiene of 3.4 are dropped. Of a level's
non-final children (over all the prompt's active nodes) the top `keep_top` and the bottom
`keep_bottom` by the pruning key go on.

Batched: the prompts and their images go into one prefix once (`GenerationService.start`); each
level's active nodes take their prompt's row of it, feed their response so far after it
(`extend`), and run one beam search for all of them. `reference_expand` is the same expansion done
the plain way (one node at a time, prompt and response fed afresh): the tests hold the two equal.

Rewards of a node's new sentence s (the CLIP score of its text against the image, `clip`):
  paper: R(s) = lam * clip + (1 - lam) * logprob(s) (the sentence's summed token log-probs);
         a path's score is its summed R (path_score='mean': per sentence); chosen = the best
         final path, rejected = the worst.
  repo:  among siblings, rank = (i + 1) / n by LM score (descending) and clip_rank likewise by
         clip; a node's value is (1 - alpha) * rank + alpha * clip_rank, a path's score the sum
         over its nodes divided by the number of nodes, root included (the released
         construct.py); chosen = the lowest, rejected = the highest.
A response that ends on the end token alone (no new text) has clip score 0.
"""

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.sampling.decode import Prefix
from lvlm_jax.sampling.sentences import SentenceConfig, next_sentences

REWARD_MODES = ("paper", "repo")
PRUNE_KEYS = ("lm", "reward")
PATH_SCORES = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class TreeConfig:
  """The search and its rewards; the defaults are CSR's (METHODS.md 3.3-3.4)."""
  sentences: SentenceConfig = help_field(SentenceConfig(), "Next-sentence beam search (CSR: 5 "
                                         "beams, 5 groups, diversity 3.0, 5 returned, <= 70 "
                                         "tokens); empty sentence_end_ids: the tokenizer's '.'.")
  keep_top: int = help_field(1, "Non-final children with the best pruning key kept per level "
                             "(CSR: 5 // 2 - 1 = 1).")
  keep_bottom: int = help_field(2, "Non-final children with the worst pruning key kept per "
                                "level (CSR: 5 // 2 = 2).")
  max_chars: int = help_field(1024, "A response this many characters long is final (CSR: 1024).")
  max_response_tokens: int = help_field(320, "A response this many tokens long is final (the "
                                        "cache room kept for it).")
  max_sentences: int = help_field(0, "A node this deep is final; 0: no limit (CSR).")
  reward: str = help_field("paper", f"One of {REWARD_MODES}: 'paper' (calibrated reward "
                           "lam * clip + (1 - lam) * logprob, summed over the path) or 'repo' "
                           "(the released code's sibling rank normalisation, path mean).")
  lam: float = help_field(0.9, "paper: weight of the CLIP score (CSR: 0.9; 0 is the ablation "
                          "without visual calibration).")
  alpha: float = help_field(0.9, "repo: weight of the CLIP rank (CSR's step3.sh: 0.9).")
  path_score: str = help_field("sum", f"One of {PATH_SCORES}, paper mode: a path's score is its "
                               "summed reward (the paper) or the mean per sentence (as the "
                               "released code averages its rank scores over the path).")
  clamp: bool = help_field(True, "Clip scores max(100 cos, 0) (the paper); False: the released "
                           "code's raw logits_per_image.")
  prune_by: str = help_field("reward", f"One of {PRUNE_KEYS}: which score picks the kept "
                             "children: 'lm' (the released code) or 'reward' (the paper's "
                             "calibrated reward, the path score of `reward`='paper').")

  def __post_init__(self):
    if self.reward not in REWARD_MODES:
      raise UserError(f"tree.reward={self.reward!r} is not one of {REWARD_MODES}")
    if self.path_score not in PATH_SCORES:
      raise UserError(f"tree.path_score={self.path_score!r} is not one of {PATH_SCORES}")
    if self.prune_by not in PRUNE_KEYS:
      raise UserError(f"tree.prune_by={self.prune_by!r} is not one of {PRUNE_KEYS}")
    if self.keep_top < 0 or self.keep_bottom < 0 or self.keep_top + self.keep_bottom < 1:
      raise UserError("tree.keep_top + tree.keep_bottom must be at least 1")
    if not 0 <= self.lam <= 1 or not 0 <= self.alpha <= 1:
      raise UserError("tree.lam and tree.alpha must be in [0, 1]")

  @property
  def active(self) -> int:
    return self.keep_top + self.keep_bottom


class Candidate(NamedTuple):
  """A next sentence: tokens int32 [L] (its end token included), the beam's length-normalised
  score, its summed log-prob, whether it ends the response."""
  tokens: np.ndarray
  score: float
  logprob: float
  ends: bool


# Node (a JSON-ready dict): id, parent (-1 for the root), depth, tokens (the response so far),
# text (decoded), new_text (this node's sentence), lm_score (cumulative), sequence_score,
# logprob, clip, reward (the paper's cumulative reward), final, active (expanded further).


def _root() -> dict:
  return {"id": 0, "parent": -1, "depth": 0, "tokens": [], "text": "", "new_text": "",
          "lm_score": 0.0, "sequence_score": 0.0, "logprob": 0.0, "clip": 0.0, "reward": 0.0,
          "final": False, "active": True}


_SCRIPTS = re.compile("[\u0400-\u04ff\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\uac00-\ud7af"
                      "\u2600-\u27bf\U0001f000-\U0001faff]")
_CHAR_RUN = re.compile(r"(\w)\1{9,}")


def _repeats(words: list[str], times: int = 6, longest: int = 8) -> bool:
  """A phrase of up to `longest` words said `times` or more times in a row."""
  for size in range(1, longest + 1):
    for start in range(len(words) - size * times + 1):
      phrase = words[start:start + size]
      if all(words[start + j * size:start + (j + 1) * size] == phrase for j in range(1, times)):
        return True
  return False


def clean(new_text: str, text: str, ends_response: bool) -> bool:
  """CSR's `clean_tree` (3.4): False for Korean, Japanese, Cyrillic or emoji characters, a phrase
  repeated 6+ times in a row, more than 5 newlines, a character run like 'tttttttttt', or a new
  sentence under 4 characters (non-word characters stripped; allowed when it ends the response)."""
  if _SCRIPTS.search(new_text) or _CHAR_RUN.search(new_text) or text.count("\n") > 5:
    return False
  if _repeats(re.findall(r"\w+", text.lower())):
    return False
  return ends_response or len(re.sub(r"\W", "", new_text)) >= 4


def sentence_reward(node: dict, config: TreeConfig) -> float:
  """paper: R(s) = lam * clip + (1 - lam) * logprob of a node's new sentence."""
  return config.lam * node["clip"] + (1 - config.lam) * node["logprob"]


def _prune(children: list[dict], config: TreeConfig) -> list[dict]:
  """The non-final children that go on: the best keep_top and the worst keep_bottom."""
  key = "lm_score" if config.prune_by == "lm" else "reward"
  ranked = sorted((c for c in children if not c["final"]), key=lambda c: -c[key])
  if len(ranked) <= config.active:
    return ranked
  return ranked[:config.keep_top] + ranked[len(ranked) - config.keep_bottom:]


Expand = Callable[[list[tuple[int, list[int]]]], list[list[Candidate]]]
Score = Callable[[list[int], list[str]], np.ndarray]


def search(num_prompts: int, expand: Expand, clip: Score, decode: Callable[[list[int]], str],
           config: TreeConfig) -> list[list[dict]]:
  """The trees of `num_prompts` prompts, grown level by level together.

  expand([(prompt, response tokens), ...]) -> k candidates each; clip(prompts, texts) -> the
  scores of texts against their prompts' images; decode(tokens) -> text. Returns each prompt's
  nodes (ids are positions in its list)."""
  ends = set(config.sentences.response_end_ids)
  trees = [[_root()] for _ in range(num_prompts)]
  active = [[0] for _ in range(num_prompts)]
  while any(active):
    work = [(p, n) for p in range(num_prompts) for n in active[p]]
    outs = expand([(p, trees[p][n]["tokens"]) for p, n in work])
    born = [[] for _ in range(num_prompts)]
    for (p, n), candidates in zip(work, outs):
      parent = trees[p][n]
      for cand in candidates:
        new = [int(t) for t in cand.tokens]
        tokens = parent["tokens"] + new
        text = decode([t for t in tokens if t not in ends])
        new_text = decode([t for t in new if t not in ends])
        if not clean(new_text, text, cand.ends):
          continue
        final = (cand.ends or len(text) >= config.max_chars
                 or len(tokens) >= config.max_response_tokens
                 or (config.max_sentences and parent["depth"] + 1 >= config.max_sentences))
        born[p].append({"parent": n, "depth": parent["depth"] + 1, "tokens": tokens,
                        "text": text, "new_text": new_text,
                        "lm_score": parent["lm_score"] + cand.score,
                        "sequence_score": cand.score, "logprob": cand.logprob,
                        "final": bool(final), "active": False})
    scored = [(p, c) for p in range(num_prompts) for c in born[p] if c["new_text"]]
    values = clip([p for p, _ in scored], [c["new_text"] for _, c in scored])
    for (_, child), value in zip(scored, values):
      child["clip"] = float(value)
    for p in range(num_prompts):
      for child in born[p]:
        child.setdefault("clip", 0.0)
        child["reward"] = trees[p][child["parent"]]["reward"] + sentence_reward(child, config)
        child["id"] = len(trees[p])
        trees[p].append(child)
      for n in active[p]:
        trees[p][n]["active"] = False
      kept = _prune(born[p], config)
      for child in kept:
        child["active"] = True
      active[p] = [c["id"] for c in kept]
  for tree in trees:
    for node in tree:
      node.pop("active")
  return trees


def _sibling_ranks(tree: list[dict]) -> dict[int, float]:
  """repo: (1 - alpha) * rank + alpha * clip_rank of every non-root node, alpha applied later."""
  children: dict[int, list[dict]] = {}
  for node in tree[1:]:
    children.setdefault(node["parent"], []).append(node)
  ranks = {}
  for siblings in children.values():
    n = len(siblings)
    by_lm = sorted(siblings, key=lambda c: -c["lm_score"])
    by_clip = sorted(siblings, key=lambda c: -c["clip"])
    for i, node in enumerate(by_lm):
      ranks.setdefault(node["id"], [0.0, 0.0])[0] = (i + 1) / n
    for i, node in enumerate(by_clip):
      ranks[node["id"]][1] = (i + 1) / n
  return ranks


def path(tree: list[dict], leaf: int) -> list[int]:
  """Node ids from the root to `leaf`."""
  ids = [leaf]
  while tree[ids[-1]]["parent"] >= 0:
    ids.append(tree[ids[-1]]["parent"])
  return ids[::-1]


def path_scores(tree: list[dict], config: TreeConfig) -> dict[int, float]:
  """{final leaf id: its path's score}, higher is better in both modes (repo's rank sum, where
  lower is better, is negated)."""
  leaves = [node["id"] for node in tree if node["final"]]
  if config.reward == "paper":
    out = {}
    for leaf in leaves:
      rewards = [sentence_reward(tree[i], config) for i in path(tree, leaf)[1:]]
      out[leaf] = sum(rewards) / (len(rewards) if config.path_score == "mean" else 1)
    return out
  ranks = _sibling_ranks(tree)
  out = {}
  for leaf in leaves:
    ids = path(tree, leaf)
    total = sum((1 - config.alpha) * ranks[i][0] + config.alpha * ranks[i][1] for i in ids[1:])
    out[leaf] = -total / len(ids)
  return out


def choose(tree: list[dict], config: TreeConfig) -> tuple[int, int] | None:
  """(chosen leaf, rejected leaf): the best and the worst final path, or None when the tree has
  fewer than two final responses or they all read the same."""
  scores = path_scores(tree, config)
  if len(scores) < 2:
    return None
  order = sorted(scores, key=lambda leaf: (-scores[leaf], leaf))
  chosen, rejected = order[0], order[-1]
  if tree[chosen]["text"] == tree[rejected]["text"]:
    return None
  return chosen, rejected


# Expansion, two ways.


@jax.jit
def _take_rows(prefix: Prefix, rows: jax.Array) -> Prefix:
  """Row i of the result continues row rows[i] (the cache's shared slot index stays)."""
  return jax.tree.map(lambda x: x[rows] if x.ndim else x, prefix)


def _candidates(beams, rows: int, ends: set[int]) -> list[list[Candidate]]:
  out = []
  for r in range(rows):
    row = []
    for j in range(beams.tokens.shape[1]):
      tokens = np.asarray(beams.tokens[r, j, :beams.lengths[r, j]], np.int32)
      row.append(Candidate(tokens, float(beams.scores[r, j]), float(beams.logprobs[r, j]),
                           bool(len(tokens)) and int(tokens[-1]) in ends))
    out.append(row)
  return out


def batched_expand(service, prompts: Sequence, sentences: SentenceConfig,
                   config: TreeConfig) -> Expand:
  """Expansion through the generation service: `prompts` (at most service.batch_size) are
  encoded once; each call feeds every node's response after its prompt's row and runs one beam
  search over all nodes (rows: batch_size * config.active, padded)."""
  room = -(-config.max_response_tokens // service.pad_to) * service.pad_to
  root, _ = service.start(prompts, room + sentences.max_new_tokens)
  rows = service.batch_size * config.active
  beam = sentences.beam_config()
  ends = set(sentences.response_end_ids)

  def expand(nodes):
    out = []
    for first in range(0, len(nodes), rows):
      chunk = nodes[first:first + rows]
      index = np.zeros((rows,), np.int32)
      index[:len(chunk)] = [p for p, _ in chunk]
      with jax.set_mesh(service.mesh):
        prefix = _take_rows(root, jnp.asarray(index))
      responses = [np.asarray(t, np.int32) for _, t in chunk]
      responses += [np.zeros((0,), np.int32)] * (rows - len(chunk))
      if any(len(t) for t in responses):
        prefix = service.extend(prefix, responses)
      out += _candidates(service.beams(prefix, beam), len(chunk), ends)
    return out
  return expand


def reference_expand(model, prompt_ids: Sequence[np.ndarray], pixels: Sequence,
                     sentences: SentenceConfig) -> Expand:
  """The same expansion the plain way: each node alone, prompt + response fed afresh.
  prompt_ids: int32 [L] per prompt; pixels: each prompt's float32 [1, N, S, S, 3] or None."""
  ends = set(sentences.response_end_ids)

  def expand(nodes):
    out = []
    for p, tokens in nodes:
      ids = np.concatenate([prompt_ids[p], np.asarray(tokens, np.int32)])[None]
      result = jax.device_get(next_sentences(model, ids, config=sentences,
                                             pixel_values=pixels[p]))
      out += _candidates(result, 1, ends)
    return out
  return expand
