"""Every CLI over a directory of bad inputs: each exits non-zero within a timeout, with one
`error:` line naming the problem and no traceback (LVLM_JAX_DEBUG=1 brings tracebacks back).

The cases run in one child Python (tests/cli_cases.py) so that the imports are paid once; the
hang-prone ones (a checkpoint or model save that Orbax cannot write) are among them, so a hang
fails the test at its timeout, naming the case."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from test_generate_cli import PREPROCESSOR, save_char_tokenizer
from training.training_fixtures import REPO, subprocess_env, write_config_file
from lvlm_jax import cli
from lvlm_jax.errors import UserError


def _model(source, directory):
  shutil.copytree(source, directory)
  save_char_tokenizer(directory)
  return str(directory)


@pytest.fixture(scope="module")
def corpus(tiny_llama_dir, tiny_llava_dir, tmp_path_factory):
  """Good models, broken copies of them, bad input files; returns the folder."""
  root = tmp_path_factory.mktemp("bad_inputs")
  llama = _model(tiny_llama_dir, root / "llama")
  llava = _model(tiny_llava_dir, root / "llava")
  (root / "llava" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
  weights = open(os.path.join(llama, "model.safetensors"), "rb").read()
  for name, content in (("zero_byte", b""), ("truncated", weights[:len(weights) // 2]),
                        ("random", os.urandom(4096))):
    _model(tiny_llama_dir, root / name)
    (root / name / "model.safetensors").write_bytes(content)
  _model(tiny_llava_dir, root / "random_llava")
  (root / "random_llava" / "model.safetensors").write_bytes(os.urandom(4096))
  shard = _model(tiny_llama_dir, root / "missing_shard")
  os.rename(os.path.join(shard, "model.safetensors"),
            os.path.join(shard, "model-00001-of-00002.safetensors"))
  names = json.loads(subprocess.run(
      [sys.executable, "-c", "import sys, json; from safetensors import safe_open; "
       "print(json.dumps(list(safe_open(sys.argv[1], 'np').keys())))",
       os.path.join(shard, "model-00001-of-00002.safetensors")],
      capture_output=True, text=True, check=True).stdout)
  weight_map = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
  (root / "missing_shard" / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))
  no_text = _model(tiny_llava_dir, root / "no_text_config")
  config = json.loads(open(os.path.join(no_text, "config.json")).read())
  del config["text_config"]
  (root / "no_text_config" / "config.json").write_text(json.dumps(config))
  pickled = root / "pickle_only"
  pickled.mkdir()
  shutil.copy(os.path.join(llama, "config.json"), pickled)
  (pickled / "pytorch_model.bin").write_bytes(b"not a pickle")
  torn = root / "ours_torn"
  (torn / "params").mkdir(parents=True)
  shutil.copy(os.path.join(llama, "config.json"), torn)
  (torn / "params" / "_METADATA").write_text("{")
  (root / "a_file").write_text("")
  (root / "empty.jsonl").write_text("\n")
  (root / "bad_utf8.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
  (root / "ok.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
  (root / "bad_utf8.json").write_bytes(
      b'[{"id": "0", "conversations": [{"from": "human", "value": "caf\xe9"},'
      b' {"from": "gpt", "value": "ok"}]}]')
  (root / "empty.json").write_text("")
  (root / "syntax_error.py").write_text("def get_config(:\n  pass\n")
  broken_run = root / "broken_run"
  broken_run.mkdir()
  (broken_run / "config.json").write_text('{"method": "sft", "optim": ')
  write_config_file(root / "tiny.py")
  return root


def cases(root) -> list[tuple[str, str, list[str], str]]:
  """(name, cli, argv, words the one error line must hold)."""
  r = lambda name: str(root / name)
  tiny = r("tiny.py")
  # A short system prompt: the tiny models' context (128 tokens) has no room for vicuna's.
  generate = lambda model, *rest: ["--model", r(model), "--max_new_tokens", "2", "--system",
                                   "A chat.", *rest]
  batch = ["--input_jsonl", r("ok.jsonl"), "--output_jsonl", r("out/ok.jsonl")]
  return [
      # 14: damaged weights, in every CLI that reads them
      *[(f"convert_{bad}", "convert", [r(bad), r(f"out/{bad}"), "--to", "hf"], words)
        for bad, words in (("zero_byte", "zero_byte/model.safetensors: not a readable"),
                           ("truncated", "truncated/model.safetensors: not a readable"),
                           ("random", "random/model.safetensors: not a readable"),
                           ("missing_shard", "names the shard model-00002-of-00002.safetensors"),
                           ("ours_torn", "ours_torn/params: cannot be restored"))],
      ("generate_zero_byte", "generate", generate("zero_byte", "--prompt", "hi"),
       "zero_byte/model.safetensors"),
      ("generate_missing_shard", "generate", generate("missing_shard", "--prompt", "hi"),
       "missing"),
      ("evaluate_truncated", "evaluate", ["--model", r("truncated"), "--config", tiny],
       "truncated/model.safetensors"),
      ("train_random", "train", ["--config", tiny, "--workdir", r("out/train_random"),
                                 f"--config.model.hf_dir={r('random_llava')}",
                                 f"--config.model.tokenizer={r('random_llava')}"],
       "random_llava/model.safetensors"),
      # 2, 16: outputs that cannot be written, checked before any loading
      ("convert_into_a_file", "convert", [r("llama"), r("a_file"), "--to", "lvlm_jax"],
       "a_file: exists and is not a directory"),
      ("convert_under_a_file", "convert", [r("llama"), r("a_file/hf"), "--to", "hf"],
       "cannot write there"),
      ("train_workdir_is_a_file", "train", ["--config", tiny, "--workdir", r("a_file")],
       "--workdir"),
      ("generate_output_under_a_file", "generate",
       generate("llama", "--input_jsonl", r("ok.jsonl"), "--output_jsonl", r("a_file/o.jsonl")),
       "--output_jsonl"),
      # 15: encodings
      ("generate_bad_utf8", "generate",
       generate("llama", "--input_jsonl", r("bad_utf8.jsonl"), "--output_jsonl", r("out/u.jsonl")),
       "bad_utf8.jsonl:1: not valid UTF-8"),
      ("train_bad_utf8_json", "train", ["--config", tiny, "--workdir", r("out/train_utf8"),
                                        f"--config.data.conversations=('{r('bad_utf8.json')}',)",
                                        "--config.data.shapes_tasks=()"],
       "bad_utf8.json:1: not valid UTF-8"),
      # 17
      ("generate_empty_input", "generate",
       generate("llama", "--input_jsonl", r("empty.jsonl"), "--output_jsonl", r("out/e.jsonl")),
       "empty.jsonl: holds no records"),
      ("generate_empty_prompt", "generate", generate("llama", "--template", "none", "--prompt", ""),
       "the prompt is empty"),
      ("generate_no_text_config", "generate", generate("no_text_config", "--prompt", "hi"),
       "no 'text_config' entry"),
      ("convert_no_text_config", "convert", [r("no_text_config"), r("out/ntc"), "--to", "hf"],
       "no 'text_config' entry"),
      ("evaluate_config_syntax_error", "evaluate", ["--model", r("llava"), "--config",
                                                    r("syntax_error.py")],
       "syntax_error.py:1: SyntaxError"),
      ("evaluate_broken_workdir_config", "evaluate", ["--workdir", r("broken_run")],
       "broken_run/config.json: not valid JSON"),
      # 18: the flag the pickle refusal names exists; a bad pickle is then one line
      ("generate_pickle_refused", "generate", generate("pickle_only", "--prompt", "hi"),
       "--allow_pickle"),
      ("generate_bad_pickle", "generate", generate("pickle_only", "--prompt", "hi",
                                                   "--allow_pickle"),
       "pytorch_model.bin: cannot be loaded"),
      ("evaluate_bad_pickle", "evaluate", ["--model", r("pickle_only"), "--allow_pickle",
                                           "--config", tiny], "pytorch_model.bin: cannot be loaded"),
      # 19
      ("train_empty_data_file", "train", ["--config", tiny, "--workdir", r("out/train_empty"),
                                          f"--config.data.conversations=('{r('empty.json')}',)",
                                          "--config.data.shapes_tasks=()"],
       "empty.json: holds no records"),
      ("train_unknown_flag", "train", ["--config", tiny, "--wrokdir", r("out/x")],
       "Unknown command line flag 'wrokdir'"),
      ("convert_max_shard_gb_0", "convert", [r("llama"), r("out/shard0"), "--to", "hf",
                                             "--max_shard_gb", "0"], "--max_shard_gb 0.0"),
      # 7
      ("train_nan_lr", "train", ["--config", tiny, "--workdir", r("out/nan"),
                                 "--config.optim.lr=nan"], "config.optim.lr=nan"),
      ("generate_ok_still_works", "generate", generate("llama", *batch), ""),
  ]


@pytest.mark.slow
def test_no_cli_prints_a_traceback_over_bad_inputs(corpus):
  table = cases(corpus)
  spec = corpus / "cases.json"
  spec.write_text(json.dumps([{"name": n, "cli": c, "argv": a} for n, c, a, _ in table]))
  results = corpus / "results.jsonl"
  try:
    subprocess.run([sys.executable, os.path.join(REPO, "tests", "cli_cases.py"), str(spec),
                    str(results)], cwd=REPO, env=subprocess_env(), capture_output=True,
                   text=True, timeout=600)
  except subprocess.TimeoutExpired:
    done = results.read_text().splitlines() if results.exists() else []
    pytest.fail(f"hung: case {table[len(done)][0]!r} did not exit within the timeout")
  got = {r["name"]: r for r in map(json.loads, results.read_text().splitlines())}
  assert list(got) == [name for name, *_ in table]
  failures = []
  for name, _, _, words in table:
    code, stderr = got[name]["code"], got[name]["stderr"]
    errors = [line for line in stderr.splitlines() if "error: " in line]
    if name.endswith("still_works"):
      ok = code == 0
    else:  # argparse's own errors come as "usage: ..." then "prog: error: ..."
      ok = (code == 2 and "Traceback" not in stderr and len(errors) == 1 and words in errors[0])
    if not ok:
      failures.append(f"{name}: exit {code}: {stderr[-600:]}")
  assert not failures, "\n".join(failures)
  with open(corpus / "out" / "ok.jsonl") as f:
    assert json.loads(f.read())["response"] is not None


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
  def broken():
    raise KeyError("boom")
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
  with pytest.raises(SystemExit) as info:
    cli.run_cli(broken)
  err = capsys.readouterr().err
  assert info.value.code == 1 and err.count("\n") == 1
  assert err.startswith("error: KeyError: 'boom' (unexpected; rerun with LVLM_JAX_DEBUG=1")
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  with pytest.raises(KeyError):
    cli.run_cli(broken)
  with pytest.raises(UserError):
    cli.run_cli(lambda: (_ for _ in ()).throw(UserError("bad")))


# After the first checkpoint is on disk, breaks the disk under the run: "full" caps the size of
# any file this process writes (RLIMIT_FSIZE, which also binds root, unlike a read-only chmod);
# "gone" replaces the checkpoint folder by a regular file (its checkpoints moved aside).
BREAK_DISK_AFTER_FIRST_SAVE = """
import os, resource, signal, sys
from lvlm_jax import train
from lvlm_jax.cli import run_cli
from lvlm_jax.training import checkpoint
how, config, workdir = sys.argv[1:]
save = checkpoint.Checkpointer.save
def breaking_save(self, step, *args, **kwargs):
  if self.latest_step() is not None:
    self.wait()
    folder = os.path.join(workdir, "checkpoints")
    if how == "gone" and os.path.isdir(folder):
      os.rename(folder, folder + ".moved")
      open(folder, "w").close()
    if how == "full":
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))
  return save(self, step, *args, **kwargs)
if how != "none":
  checkpoint.Checkpointer.save = breaking_save
run_cli(lambda: train.main(["train", "--config", config, "--workdir", workdir]))
"""


@pytest.mark.slow
def test_a_failed_checkpoint_save_stops_the_run_in_one_line(tmp_path):
  """A full disk (sync saves: a raw traceback before) and a vanished folder (async saves, the
  default: Orbax's failed background save hung the run at 0% CPU for its 300 s barrier): exit 2
  at once with one line naming the folder and the last good checkpoint; with the folder back,
  the same command resumes from that checkpoint and finishes."""
  config = write_config_file(tmp_path / "tiny.py", **{"train.log_every": 8,
                                                     "checkpoint.every_steps": 2})
  sync = write_config_file(tmp_path / "sync.py", **{"train.log_every": 8,
                                                   "checkpoint.every_steps": 2,
                                                   "checkpoint.async_save": False})
  run = lambda how, config, workdir: subprocess.run(
      [sys.executable, "-c", BREAK_DISK_AFTER_FIRST_SAVE, how, config, str(workdir)], cwd=REPO,
      env=subprocess_env(), capture_output=True, text=True, timeout=120)
  for how, config_file in (("full", sync), ("gone", config)):
    workdir = tmp_path / f"{how}_{os.path.basename(config_file)}"
    proc = run(how, config_file, workdir)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: cannot write a checkpoint to {workdir}/checkpoints (step "), errors
    kept = "checkpoints.moved" if how == "gone" else "checkpoints"
    steps = [s for s in os.listdir(workdir / kept) if s.isdigit()]
    assert len(steps) == 1 and f"The last checkpoint on disk is step {steps[0]}" in errors[0]
  os.remove(workdir / "checkpoints")  # the disk is back
  os.rename(workdir / "checkpoints.moved", workdir / "checkpoints")
  resumed = run("none", config, workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming from step {steps[0]}" in resumed.stdout + resumed.stderr
  with open(workdir / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f if '"train"' in line]
  assert logged[-1]["step"] == 8
