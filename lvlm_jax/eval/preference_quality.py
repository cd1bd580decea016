"""How good the two answers of a preference pair truly are, measured against the scene.

Self-rewarding methods (STIC, CSR) label one self-generated answer "chosen" and one "rejected"
without knowing the truth. On the shapes world the truth is known, so each pair can be judged:
chosen is truly *better* when it Pareto-dominates rejected on (hallucinated mentions: fewer,
recalled objects: more), *worse* when rejected dominates it, a *tie* when both counts are equal
and *mixed* otherwise (one has fewer hallucinations, the other more recall). DPO on a pair
teaches the direction chosen - rejected, so the share of truly better pairs says what the
preference data teaches.
"""

from collections.abc import Iterable, Mapping

from lvlm_jax.data.shapes import Scene
from lvlm_jax.eval.hallucination import DescriptionCounts, description_counts

VERDICTS = ("better", "worse", "tie", "mixed")


def verdict(chosen: DescriptionCounts, rejected: DescriptionCounts) -> str:
  """'better' | 'worse' | 'tie' | 'mixed': chosen against rejected, as the module says."""
  fewer = chosen.hallucinated - rejected.hallucinated  # < 0: chosen hallucinates less
  more = chosen.recalled - rejected.recalled  # > 0: chosen recalls more
  if fewer == 0 and more == 0:
    return "tie"
  if fewer <= 0 and more >= 0:
    return "better"
  if fewer >= 0 and more <= 0:
    return "worse"
  return "mixed"


def pair_quality(chosen: str, rejected: str, scene: Scene) -> dict:
  """One pair's row: both answers' counts and the verdict."""
  c, r = description_counts(chosen, scene), description_counts(rejected, scene)
  return {"verdict": verdict(c, r), "chosen": c._asdict(), "rejected": r._asdict()}


def _side(rows: list[dict], side: str) -> dict[str, float]:
  total = lambda field: sum(row[side][field] for row in rows)
  return {f"{side}_chair_i": total("hallucinated") / max(total("mentions"), 1),
          f"{side}_recall": total("recalled") / max(total("objects"), 1),
          f"{side}_words": total("words") / max(len(rows), 1)}


def summarize(rows: Iterable[Mapping], kinds: Iterable[str]) -> dict[str, dict[str, float]]:
  """Per kind of rejected answer (and "all"): pairs, the share of each verdict, and both sides'
  mention-level chair_i, recall and mean words. rows and kinds are paired."""
  groups: dict[str, list] = {"all": []}
  for row, kind in zip(rows, kinds, strict=True):
    groups["all"].append(row)
    groups.setdefault(kind, []).append(row)
  out = {}
  for kind, members in groups.items():
    n = len(members)
    out[kind] = {"pairs": n,
                 **{f"chosen_{v}": sum(r["verdict"] == v for r in members) / max(n, 1)
                    for v in VERDICTS},
                 **_side(members, "chosen"), **_side(members, "rejected")}
  return out
