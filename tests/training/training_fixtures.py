"""Tiny models, batches and configs shared by the training tests.

Importing this module turns on JAX's persistent compilation cache (unless the environment already
chose a directory): train steps take 5-15 s to compile on a 2-core CPU, a cache hit well under 1 s.
Subprocesses started through `subprocess_env` share the cache.
"""

import os
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR",
                           os.path.join(os.path.expanduser("~"), ".cache", "lvlm_jax_xla"))
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from lvlm_jax.models.llm import LLMConfig  # noqa: E402
from lvlm_jax.models.lvlm import LVLM, LVLMConfig  # noqa: E402
from lvlm_jax.models.vision import CLIPVisionConfig  # noqa: E402

VOCAB, IMAGE_TOKEN, IMAGE_SIZE, TOKENS_PER_IMAGE = 64, 63, 16, 4
BATCH, LENGTH = 8, 32

TINY_LVLM = LVLMConfig(
    vision=CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                            image_size=IMAGE_SIZE, patch_size=8),
    text=LLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8),
    image_token_id=IMAGE_TOKEN)


def tiny_lvlm(seed: int = 0) -> LVLM:
  return LVLM(TINY_LVLM, rngs=nnx.Rngs(params=seed))


def batch(seed: int = 0, rows: int = BATCH, length: int = LENGTH) -> dict[str, np.ndarray]:
  """A batch of the data contract: one image (4 tokens after BOS), right padding of different
  lengths, and targets on the second half of each row, so rows have different token counts."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, IMAGE_TOKEN, (rows, length)).astype(np.int32)
  ids[:, 0] = 1
  ids[:, 1:1 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
  lengths = rng.integers(length // 2, length + 1, rows)
  attention = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  loss = ((np.arange(length)[None] >= lengths[:, None] // 2) & (attention > 0)).astype(np.float32)
  ids = np.where(attention > 0, ids, 0).astype(np.int32)
  return {"input_ids": ids, "loss_mask": loss, "attention_mask": attention,
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
          "pixel_values": rng.normal(size=(rows, 1, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),
          "image_mask": np.ones((rows, 1), np.int32)}


@nnx.jit
def logits_of(model, batch):
  """model(...) logits [B, T, V] under jit (eager NNX compiles op by op and is slow)."""
  logits, _ = model(batch["input_ids"], positions=batch["positions"],
                    attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
  return logits


# A run of the real CLI/sft.run that finishes in seconds: a tiny model from scratch on the shapes
# world's yes/no questions (about 25 tokens each), no evaluation or export.
TINY_RUN = {
    "model.vision.hidden_size": 32, "model.vision.intermediate_size": 48,
    "model.vision.num_layers": 1, "model.vision.num_heads": 2, "model.vision.image_size": 16,
    "model.vision.patch_size": 8, "model.text.hidden_size": 32,
    "model.text.intermediate_size": 64, "model.text.num_layers": 2, "model.text.num_heads": 4,
    "model.text.num_kv_heads": 2,
    "data.shapes_tasks": (("yes_no", 256),), "data.pipeline.system_prompt": "",
    "data.pipeline.length_buckets": (32,), "data.pipeline.read_threads": 1,
    "optim.lr": 3e-3, "optim.warmup_ratio": 0.0,
    "train.num_steps": 8, "train.batch_size": 8, "train.log_every": 1,
    "train.progress_bar": False, "train.peak_flops": 1e9, "train.tensorboard": False,
    "checkpoint.every_steps": 5, "checkpoint.keep": 2, "checkpoint.export_hf": False,
    "checkpoint.export_lora": False,
    "eval.yes_no": 0, "eval.grounding": 0, "eval.captions": 0,
}


def tiny_run_config(**overrides):
  """The TINY_RUN ConfigDict, with `overrides` ('section.key' -> value) on top."""
  from lvlm_jax.methods import sft
  config = sft.default_config()
  for key, value in {**TINY_RUN, **overrides}.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def write_config_file(path, **overrides) -> str:
  """A config file for `python -m lvlm_jax.train` holding TINY_RUN plus `overrides`."""
  lines = ["from lvlm_jax.methods import sft", "", "", "def get_config():",
           "  config = sft.default_config()"]
  for key, value in {**TINY_RUN, **overrides}.items():
    lines.append(f"  config.{key} = {value!r}")
  lines.append("  return config")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


def subprocess_env(fast_compile: bool = True, **extra) -> dict[str, str]:
  """Environment for child Pythons: CPU JAX, this repo importable, the shared compile cache, and
  (fast_compile) XLA's cheapest optimisation level: compiles twice as fast, tiny models run fast
  anyway, but the numbers differ in the last bits from an in-process (default level) run."""
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  if fast_compile:
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""),
                                 "--xla_backend_optimization_level=0"]).strip()
  env.update(extra)
  return env


def run_python(args: list[str], timeout: float = 300, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(**env),
                        capture_output=True, text=True, timeout=timeout)
