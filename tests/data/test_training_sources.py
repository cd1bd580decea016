"""The training mixture: conversation files repeated per epoch as the config says."""

import json
from collections import Counter

import pytest

from lvlm_jax.data.training_sources import DataSources, training_source
from lvlm_jax.errors import UserError


def _file(path, name: str, count: int) -> str:
  with open(path, "w") as f:
    for i in range(count):
      f.write(json.dumps({"id": f"{name}{i}", "conversations": [
          {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}) + "\n")
  return str(path)


def test_each_file_the_stated_number_of_times_per_epoch(tmp_path):
  """CaD-VI's recipe: the base file once, phase 1 listed twice, phase 2 once, beside 4 shapes
  captions; one epoch holds every record of a file exactly its count of times."""
  files = (_file(tmp_path / "base.jsonl", "base", 5), _file(tmp_path / "p1.jsonl", "p1", 3),
           _file(tmp_path / "p2.jsonl", "p2", 2))
  source = training_source(DataSources(shapes_tasks=(("caption", 4),), conversations=files,
                                       conversation_repeats=(1, 2, 1)))
  assert len(source) == 4 + 5 + 2 * 3 + 2
  seen = Counter(source[i]["id"] for i in range(len(source)))
  assert {k: v for k, v in seen.items() if not k.startswith("shapes")} == {
      **{f"base{i}": 1 for i in range(5)}, **{f"p1{i}": 2 for i in range(3)},
      **{f"p2{i}": 1 for i in range(2)}}
  assert sum(v for k, v in seen.items() if k.startswith("shapes")) == 4
  one = training_source(DataSources(shapes_tasks=(), conversations=files[1:2],
                                    conversation_repeats=(3,)))
  assert Counter(one[i]["id"] for i in range(len(one))) == {f"p1{i}": 3 for i in range(3)}


def test_repeats_need_one_count_per_file(tmp_path):
  path = _file(tmp_path / "a.jsonl", "a", 2)
  with pytest.raises(UserError, match="one count per file"):
    training_source(DataSources(shapes_tasks=(), conversations=(path,),
                                conversation_repeats=(1, 2)))
