"""Two processes on localhost, two CPU devices each: every process feeds its own data shard into
global batches, the run checkpoints collectively, and a restart of both restores and finishes."""

import json
import os
import socket
import subprocess
import sys

from training_fixtures import REPO, subprocess_env, write_config_file


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(config: str, workdir, num_steps: int, export: bool) -> list[subprocess.CompletedProcess]:
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "lvlm_jax.train", "--config", config, "--workdir", str(workdir),
       f"--config.train.num_steps={num_steps}", f"--config.checkpoint.export_hf={export}",
       f"--config.mesh.coordinator_address=127.0.0.1:{port}", "--config.mesh.num_processes=2",
       f"--config.mesh.process_id={i}", "--config.mesh.cpu_devices=2"],
      cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  results = []
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=300)
    results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
  return results


def test_two_processes_train_save_and_restore(tmp_path):
  config = write_config_file(tmp_path / "tiny.py", **{"checkpoint.every_steps": 2})
  workdir = tmp_path / "run"
  first = launch(config, workdir, num_steps=4, export=False)
  assert all(p.returncode == 0 for p in first), first[0].stderr[-3000:] + first[1].stderr[-3000:]
  assert "4 devices, 2 processes" in first[0].stdout
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  second = launch(config, workdir, num_steps=6, export=True)
  assert all(p.returncode == 0 for p in second), second[0].stderr[-3000:] + second[1].stderr[-3000:]
  assert "resuming from step 4" in second[0].stdout
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train = {r["step"]: r for r in records if r["kind"] == "train"}
  assert sorted(train) == list(range(1, 7))
  # Each process read half of every global batch of 8 from its own shard of the data.
  assert train[4]["examples_seen"] == 4 * 4 and train[6]["examples_seen"] == 6 * 4
  assert os.path.exists(workdir / "export" / "hf" / "model.safetensors")
