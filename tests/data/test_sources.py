"""File sources (LLaVA JSON/JSONL, preference, grounding), bad lines, image roots, mixtures."""

import json
import pickle

import pytest

from lvlm_jax.data import sources
from lvlm_jax.data.images import BadImage
from lvlm_jax.errors import UserError


def write_jsonl(path, lines):
  path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
  return path


@pytest.fixture
def roots(tmp_path):
  """Two image folders: a.jpg in both, b.jpg only in the second."""
  first, second = tmp_path / "img1", tmp_path / "img2"
  first.mkdir()
  second.mkdir()
  for path in (first / "a.jpg", second / "a.jpg", second / "b.jpg"):
    path.write_bytes(b"x")
  return [str(first), str(second)]


def conversation(i, image="a.jpg", question="What is it?"):
  record = {"id": f"r{i}", "conversations": [{"from": "human", "value": question},
                                             {"from": "gpt", "value": f"Answer {i}."}]}
  if image is not None:
    record["image"] = image
  return record


def test_llava_json_list_and_jsonl_read_the_same(tmp_path, roots):
  records = [conversation(0), conversation(1, image=["a.jpg", "b.jpg"],
                                           question="Image 1: <image>\nImage 2: <image>\nSame?"),
             conversation(2, image=None)]
  records[0]["extra"] = {"scene": [1, 2]}
  (tmp_path / "d.json").write_text(json.dumps(records, indent=2))
  write_jsonl(tmp_path / "d.jsonl", records)
  for name in ("d.json", "d.jsonl"):
    src = sources.ConversationSource(tmp_path / name, roots)
    assert len(src) == 3 and src.skipped == {}
    first = src[0]
    assert first["images"] == [roots[0] + "/a.jpg"]
    # No placeholder in the text: LLaVA puts one <image>\n before the first human turn.
    assert first["conversations"][0] == {"from": "human", "value": "<image>\nWhat is it?"}
    assert first["extra"] == {"scene": [1, 2]} and first["id"] == "r0" and "image" not in first
    pair = src[1]
    assert pair["images"] == [roots[0] + "/a.jpg", roots[1] + "/b.jpg"]
    assert pair["conversations"][0]["value"] == "Image 1: <image>\nImage 2: <image>\nSame?"
    assert src[2]["images"] == [] and src[2]["conversations"][0]["value"] == "What is it?"
  assert sources.ConversationSource(tmp_path / "d.jsonl", roots)[0]["origin"].endswith("d.jsonl:1")


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be"])
def test_json_list_with_a_bom_or_as_utf16_is_read(tmp_path, roots, encoding):
  records = [conversation(0, question="Qu'y a-t-il ? éè"), conversation(1)]
  for name, text in (("d.json", json.dumps(records, ensure_ascii=False)),
                     ("d.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in records))):
    (tmp_path / name).write_bytes(text.encode(encoding))
    src = sources.ConversationSource(tmp_path / name, roots)
    assert len(src) == 2 and src.skipped == {}
    assert src[0]["conversations"][0]["value"] == "<image>\nQu'y a-t-il ? éè"


def test_invalid_utf8_in_a_json_list_names_the_line(tmp_path, roots):
  text = json.dumps([conversation(0), conversation(1)], indent=1).encode()
  broken = text.replace(b"Answer 1.", b"Answer \xff1.")
  (tmp_path / "d.json").write_bytes(broken)
  line = broken[:broken.index(b"\xff")].count(b"\n") + 1
  with pytest.raises(UserError, match=rf"d\.json:{line}: not valid UTF-8 \(byte \d+"):
    sources.ConversationSource(tmp_path / "d.json", roots)


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_data_file_says_so(tmp_path, roots, content):
  (tmp_path / "d.json").write_text(content)
  with pytest.raises(UserError, match=r"d\.json: holds no records") as info:
    sources.ConversationSource(tmp_path / "d.json", roots)
  assert "None" not in str(info.value)


def test_broken_lines_skipped_and_counted(tmp_path, roots):
  lines = [conversation(i) for i in range(18)]
  lines.insert(5, '{"id": "broken", "conversations": [')  # line 6
  lines.insert(9, {"id": "no-gpt", "conversations": [{"from": "human", "value": "hi"}]})
  src = sources.ConversationSource(write_jsonl(tmp_path / "d.jsonl", lines), roots,
                                   max_bad_fraction=0.1)
  assert len(src) == 18 and src.skipped == {"bad_json": 1, "bad_record": 1}
  assert [src[i]["id"] for i in range(18)] == [f"r{i}" for i in range(18)]


def test_too_many_bad_lines_name_file_and_line(tmp_path, roots):
  lines = [conversation(0), "not json", conversation(1), {"id": "x", "image": 3}]
  path = write_jsonl(tmp_path / "d.jsonl", lines)
  with pytest.raises(UserError, match=r"2 of 4 records are malformed.*d\.jsonl:2: not valid JSON"):
    sources.ConversationSource(path, roots)
  (tmp_path / "bad.json").write_text('[{"id": 1},\n  {"id": 2,,}]')
  with pytest.raises(UserError, match=r"bad\.json:2: not valid JSON"):
    sources.ConversationSource(tmp_path / "bad.json", roots)


def test_placeholder_count_mismatch_is_a_bad_record(tmp_path, roots):
  lines = [conversation(i) for i in range(3)] + [conversation(3, question="<image> <image> two?")]
  src = sources.ConversationSource(write_jsonl(tmp_path / "d.jsonl", lines), roots,
                                   max_bad_fraction=0.5)
  assert len(src) == 3 and src.skipped == {"bad_record": 1}


def test_image_problems_surface_on_access_naming_the_line(tmp_path, roots):
  lines = [conversation(0), conversation(1, image="../d.jsonl"), conversation(2, image="zz.jpg")]
  src = sources.ConversationSource(write_jsonl(tmp_path / "d.jsonl", lines), roots)
  assert len(src) == 3
  with pytest.raises(BadImage, match=r"d\.jsonl:2: .*outside the image roots") as e:
    src[1]
  assert e.value.reason == "image_outside_root"
  with pytest.raises(BadImage, match=r"d\.jsonl:3: ") as e:
    src[2]
  assert e.value.reason == "image_missing"


def test_default_root_is_the_data_folder(tmp_path):
  (tmp_path / "here.jpg").write_bytes(b"x")
  src = sources.ConversationSource(write_jsonl(tmp_path / "d.jsonl", [conversation(0, "here.jpg")]))
  assert src[0]["images"] == [str(tmp_path / "here.jpg")]


def test_preference_both_layouts(tmp_path, roots):
  flat = {"id": "f", "image": "a.jpg", "prompt": "Describe.", "chosen": "Good.",
          "rejected": "Bad.", "ref_chosen_logp": -1.5, "ref_rejected_logp": -2.5}
  csr = {"id": "c", "image": "b.jpg",
         "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                           {"from": "gpt", "value": "Good."}],
         "rejected_conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                    {"from": "gpt", "value": "Bad."}]}
  trl = {"id": "t", "images": ["a.jpg"], "prompt": [{"role": "user", "content": "Describe."}],
         "chosen": [{"role": "assistant", "content": "Good."}],
         "rejected": [{"role": "assistant", "content": "Bad."}]}
  src = sources.PreferenceSource(write_jsonl(tmp_path / "p.jsonl", [flat, csr, trl]), roots)
  assert src.skipped == {}
  for i in range(3):
    record = src[i]
    assert record["prompt"] == [{"from": "human", "value": "<image>\nDescribe."}]
    assert (record["chosen"], record["rejected"]) == ("Good.", "Bad.")
    assert len(record["images"]) == 1
  assert src[0]["ref_chosen_logp"] == -1.5 and src[1]["images"] == [roots[1] + "/b.jpg"]


def test_preference_bad_records(tmp_path, roots):
  good = {"image": "a.jpg", "prompt": "Q", "chosen": "A", "rejected": "B"}
  bad = [{"image": "a.jpg", "prompt": "Q", "chosen": "A"},
         {"image": "a.jpg", "prompt": [{"from": "gpt", "value": "Q"}], "chosen": "A", "rejected": "B"},
         {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]
  src = sources.PreferenceSource(write_jsonl(tmp_path / "p.jsonl", [good] * 7 + bad), roots,
                                 max_bad_fraction=0.5)
  assert len(src) == 7 and src.skipped == {"bad_record": 3}


def test_grounding(tmp_path, roots):
  lines = [{"id": "g", "image": "a.jpg", "box": [0.1, 0.2, 0.5, 0.9], "expression": "the cat",
            "answer": 1},
           {"image_id": "b.jpg", "bbox": [0, 0, 1, 1]},  # SC-Tune's object365.json spelling
           {"image": "a.jpg", "box": [10, 20, 50, 90]},  # pixels, not normalised
           {"image": "a.jpg", "box": [0.5, 0.2, 0.1, 0.9]},  # x1 > x2
           {"image": "a.jpg", "box": [0.1, 0.2, "x", 0.9]}]
  src = sources.GroundingSource(write_jsonl(tmp_path / "g.jsonl", lines), roots, max_bad_fraction=0.6)
  assert len(src) == 2 and src.skipped == {"bad_record": 3}
  assert src[0]["box"] == [0.1, 0.2, 0.5, 0.9] and src[0]["expression"] == "the cat"
  assert src[0]["answer"] == 1
  assert src[1]["expression"] is None and src[1]["images"] == [roots[1] + "/b.jpg"]


def test_sources_pickle(tmp_path, roots):
  path = write_jsonl(tmp_path / "d.jsonl", [conversation(i) for i in range(4)])
  src = sources.ConversationSource(path, roots)
  again = pickle.loads(pickle.dumps(src))
  assert [again[i] for i in range(4)] == [src[i] for i in range(4)]


def test_mixture_repeats_like_cad_vi():
  a, b = [{"id": f"a{i}"} for i in range(3)], [{"id": f"b{i}"} for i in range(2)]
  mix = sources.Mixture([a, b, a], repeats=[1, 1, 1])
  assert [r["id"] for r in (mix[i] for i in range(len(mix)))] == ["a0", "a1", "a2", "b0", "b1",
                                                                   "a0", "a1", "a2"]
  assert len(sources.Mixture([a, b], repeats=[2, 0])) == 6


def test_mixture_weights():
  a, b = [{"id": f"a{i}"} for i in range(10)], [{"id": f"b{i}"} for i in range(100)]
  mix = sources.Mixture([a, b], weights=[3, 1], num_examples=40, seed=1)
  ids = [mix[i]["id"] for i in range(len(mix))]
  assert len(ids) == 40 and sum(i[0] == "a" for i in ids) == 30
  assert sorted(set(i for i in ids if i[0] == "a")) == sorted(r["id"] for r in a)  # cycles a 3x
  assert len(set(i for i in ids if i[0] == "b")) == 10  # a random 10 of b's 100
  assert [i[0] for i in ids[:8]] == ["a", "a", "b", "a", "a", "a", "b", "a"]  # evenly interleaved
  assert ids == [sources.Mixture([a, b], weights=[3, 1], num_examples=40, seed=1)[i]["id"]
                 for i in range(40)]
  assert len(sources.Mixture([a, b], weights=[1, 1])) == 110


def test_mixture_counts_and_checks(tmp_path, roots):
  path = write_jsonl(tmp_path / "d.jsonl", [conversation(i) for i in range(19)] + ["{"])
  src = sources.ConversationSource(path, roots)
  assert sources.Mixture([src, src], repeats=[1, 2]).skipped == {"bad_json": 1}
  with pytest.raises(UserError, match="either repeats or weights"):
    sources.Mixture([src], repeats=[1], weights=[1])
  with pytest.raises(UserError, match="integer"):
    sources.Mixture([src], repeats=[1.5])
  with pytest.raises(UserError, match="empty"):
    sources.Mixture([src, []])
  assert len(sources.Mixture([src])) == 19
