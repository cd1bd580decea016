"""The stage pipeline: a run killed or preempted inside each kind of stage (generation by batches,
training from checkpoints, evaluation) and rerun ends with the artifacts of an uninterrupted run;
a finished pipeline's rerun changes no file; a live workdir refuses a second launch; a torn state
file only redoes stages; only_stage / stop_after run what they say."""

import hashlib
import json
import os

import pytest
from ml_collections import config_dict

from lvlm_jax import preemption
from lvlm_jax.artifacts import JsonlWriter, read_jsonl
from lvlm_jax.errors import UserError
from lvlm_jax.methods.pipeline import Pipeline, PipelineConfig, Stage, WorkdirLock


class Killed(BaseException):
  """Ends a stage as kill -9 would: nothing after it runs, no state is recorded."""


def toy(workdir: str, kill: str = "", config: PipelineConfig = PipelineConfig(), calls=None,
        train_key: str = ""):
  """generate (3 batches of 2 records) -> train (6 'steps', a checkpoint file per step) ->
  evaluate. `kill` names the point where the stage dies: 'generate:1' after batch 1,
  'train:3' after step 3, 'train:sigterm:3' a SIGTERM there, 'eval'."""
  calls = calls if calls is not None else []
  records = os.path.join(workdir, "gen", "records.jsonl")
  checkpoints = os.path.join(workdir, "train", "checkpoints")

  def generate():
    calls.append("generate")
    writer = JsonlWriter(records, 2)
    for first in range(writer.resume(), 6, 2):
      preemption.check()
      writer.append([{"i": i, "text": f"record {i}"} for i in (first, first + 1)])
      if kill == f"generate:{first // 2}":
        raise Killed()
    writer.close()
    return "done"

  def train():
    calls.append("train")
    os.makedirs(checkpoints, exist_ok=True)
    done = [int(n) for n in os.listdir(checkpoints)]
    value = 0 if not done else json.load(open(os.path.join(checkpoints, str(max(done)))))
    for step in range(max(done, default=0) + 1, 7):
      value = value * 3 + sum(r["i"] for r in read_jsonl(records)) + step
      with open(os.path.join(checkpoints, str(step)), "w") as f:
        json.dump(value, f)
      if kill == f"train:{step}":
        raise Killed()
      if kill == f"train:sigterm:{step}":
        preemption.request()
        return {"status": "preempted", "step": step}
    return {"status": "done", "step": 6}

  def evaluate():
    calls.append("eval")
    if kill == "eval":
      raise Killed()
    value = json.load(open(os.path.join(checkpoints, "6")))
    return {"score": float(value % 97)}

  stages = [Stage("generate", generate), Stage("train", train, key=train_key),
            Stage("eval_train", evaluate, eval_label="train")]
  raw = config_dict.ConfigDict({"method": "toy", "kill": kill})
  return Pipeline("toy", workdir, stages, config, raw)


def files(workdir: str) -> dict[str, str]:
  """Relative path -> content hash of every file a run leaves (bookkeeping files apart)."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, workdir)
      if rel in ("pipeline.json", "summary.json", "config.json", ".lock"):
        continue
      out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


@pytest.fixture(autouse=True)
def no_pending_preemption():
  preemption.clear()
  yield
  preemption.clear()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  summary = toy(workdir).run()
  assert summary["status"] == "done"
  return workdir, summary


@pytest.mark.parametrize("kill", ["generate:0", "generate:1", "train:2", "train:5", "eval"])
def test_killed_inside_each_kind_of_stage_resumes_to_the_same_artifacts(straight, tmp_path, kill):
  workdir = str(tmp_path)
  with pytest.raises(Killed):
    toy(workdir, kill).run()
  summary = toy(workdir).run()
  assert summary["status"] == "done"
  assert files(workdir) == files(straight[0])
  assert summary["eval"] == straight[1]["eval"]
  assert [s["name"] for s in summary["stages"]] == ["generate", "train", "eval_train"]


def test_sigterm_stops_and_the_rerun_finishes(straight, tmp_path):
  workdir = str(tmp_path)
  first = toy(workdir, "train:sigterm:3").run()
  assert first["status"] == "preempted"
  assert [s["status"] for s in first["stages"]] == ["done", "preempted", "pending"]
  assert first["stages"][1]["step"] == 3
  preemption.clear()
  calls = []
  second = toy(workdir, calls=calls).run()
  assert second["status"] == "done" and calls == ["train", "eval"]
  assert second["stages"][1]["attempts"] == 2 and second["stages"][1]["step"] == 6
  assert files(workdir) == files(straight[0])


def test_a_pending_sigterm_stops_before_the_next_stage(tmp_path):
  calls = []
  preemption.request()
  summary = toy(str(tmp_path), calls=calls).run()
  assert summary["status"] == "preempted" and calls == []


def test_a_finished_pipeline_changes_no_file(straight, capsys):
  workdir, summary = straight
  before = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      before[path] = (os.stat(path).st_mtime_ns, open(path, "rb").read())
  calls = []
  again = toy(workdir, calls=calls).run()
  assert calls == [] and again == json.load(open(os.path.join(workdir, "summary.json")))
  assert again["eval"] == summary["eval"]
  assert "already finished" in capsys.readouterr().out
  after = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      after[path] = (os.stat(path).st_mtime_ns, open(path, "rb").read())
  assert after == before


def test_a_torn_state_file_redoes_stages_to_the_same_result(straight, tmp_path):
  workdir = str(tmp_path)
  toy(workdir).run()
  for name in ("pipeline.json", "summary.json"):
    with open(os.path.join(workdir, name), "w") as f:
      f.write('{"stages": {"gen')  # torn mid-write
  with open(os.path.join(workdir, "eval", "train.json"), "w") as f:
    f.write("")
  summary = toy(workdir).run()
  assert summary["status"] == "done" and summary["eval"] == straight[1]["eval"]
  assert files(workdir) == files(straight[0])


def test_a_live_workdir_refuses_a_second_launch(tmp_path):
  workdir = str(tmp_path)
  with WorkdirLock(workdir):
    with pytest.raises(UserError, match=r"in use by a live run \(pid \d+"):
      toy(workdir).run()
  assert not os.path.exists(os.path.join(workdir, "pipeline.json"))
  assert toy(workdir).run()["status"] == "done"  # the lock went with its holder


def test_only_stage_and_stop_after(straight, tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(UserError, match="needs the stages before it done first: generate"):
    toy(workdir, config=PipelineConfig(only_stage="train")).run()
  calls = []
  partial = toy(workdir, config=PipelineConfig(stop_after="generate"), calls=calls).run()
  assert partial["status"] == "partial" and calls == ["generate"]
  partial = toy(workdir, config=PipelineConfig(only_stage="train"), calls=calls).run()
  assert partial["status"] == "partial" and calls == ["generate", "train"]
  summary = toy(workdir, calls=calls).run()
  assert summary["status"] == "done" and calls == ["generate", "train", "eval"]
  assert files(workdir) == files(straight[0])
  with pytest.raises(UserError, match="pipeline.only_stage='nope' is not a stage of toy"):
    toy(workdir, config=PipelineConfig(only_stage="nope"))


def test_config_json_is_kept_until_the_new_config_is_accepted(tmp_path):
  """A launch whose stage refuses it (a UserError) leaves the earlier config.json as it was."""
  workdir = str(tmp_path)
  toy(workdir, "train:sigterm:2").run()
  preemption.clear()
  before = open(os.path.join(workdir, "config.json")).read()

  def refuse():
    raise UserError("this config does not match the checkpoints")

  raw = config_dict.ConfigDict({"method": "toy", "kill": "other"})
  stages = [Stage("generate", lambda: "done"), Stage("train", refuse)]
  with pytest.raises(UserError):
    Pipeline("toy", workdir, stages, PipelineConfig(), raw).run()
  assert open(os.path.join(workdir, "config.json")).read() == before


def test_a_stage_whose_key_changed_runs_again_with_the_ones_after_it(straight, tmp_path):
  """A finished pipeline relaunched with another config for its training stage (say, more
  steps): that stage and the evaluation after it run again, the generation before it does not."""
  workdir = str(tmp_path)
  toy(workdir).run()
  calls = []
  again = toy(workdir, calls=calls, train_key='{"num_steps": 12}').run()
  assert again["status"] == "done" and calls == ["train", "eval"]
  calls.clear()
  assert toy(workdir, calls=calls, train_key='{"num_steps": 12}').run() == again and calls == []
