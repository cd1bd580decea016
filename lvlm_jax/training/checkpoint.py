"""Checkpoints of a training run (Orbax), and the final exports (HF safetensors, LoRA adapters).

A checkpoint is `workdir/checkpoints/<step>/` with two items: `state` (the train state pytree,
sharded: each host writes and reads only its shards) and `data_iter` (each process's Grain
iterator position, so a resumed run sees exactly the batches it would have seen). Orbax writes a
step into a temporary directory and renames it when complete, so a process killed in the middle
of a save (even with kill -9) leaves the previous checkpoints intact and the partial one is
ignored and cleaned up on the next start.

A save that fails (full disk, read-only or vanished folder) raises `CheckpointWriteError`, a
UserError the CLIs print on one line: the run stops, and the checkpoints already on disk stay
usable. The folder is probed before each save because Orbax, when its background thread fails to
create a step's folder, leaves its other threads waiting out a 300 s barrier.
"""

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from lvlm_jax.data import text
from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.data.qwen2_vl_images import Qwen2VLImageProcessing
from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.models import hf
from lvlm_jax.models.llava_next import LlavaNextConfig, LlavaOnevisionConfig
from lvlm_jax.models.lora import LoRA, linear_layers
from lvlm_jax.models.lvlm import LVLM
from lvlm_jax.output_paths import check_output_dir


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When and what to checkpoint, and what to export at the end."""
  every_steps: int = help_field(500, "Save every this many steps (and at the end, "
                                "and on SIGTERM); 0 saves only then.")
  keep: int = help_field(2, "Checkpoints kept; older ones are deleted.")
  async_save: bool = help_field(True, "Write checkpoints in a background "
                                "thread while training goes on.")
  save_frozen: bool = help_field(True, "Also save frozen weights. False (for runs from an HF "
                                 "checkpoint) re-reads them from model.hf_dir on resume: much "
                                 "smaller checkpoints for LoRA runs.")
  export_hf: bool = help_field(True, "At the end, write the model (LoRA merged) as an HF directory "
                               "that transformers loads: workdir/export/hf.")
  export_lora: bool = help_field(True, "At the end, also write the LoRA adapters alone (PEFT "
                                 "layout): workdir/export/lora.")
  export_dtype: str = help_field("float32", "dtype of the exported HF tensors: "
                                 "float32, bfloat16 or float16.")


class CheckpointWriteError(UserError):
  """A checkpoint could not be written; the earlier ones are intact."""


class Checkpointer:
  """Save and restore train state + data iterator under `directory`; see the module docstring."""

  def __init__(self, directory: str, config: CheckpointConfig):
    self.config = config
    self._saving = None  # the step of the latest save started
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep, enable_async_checkpointing=config.async_save,
            cleanup_tmp_directories=True, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether `save(step)` (without force) will write a checkpoint: every `every_steps`."""
    every = self.config.every_steps
    return bool(every) and step % every == 0

  def _write_failed(self, step: int, error: Exception) -> CheckpointWriteError:
    kept = self._manager.latest_step()
    reason = " ".join(str(error).split())[:300]
    if not isinstance(error, UserError):
      reason = f"{type(error).__name__}: {reason}"
    return CheckpointWriteError(
        f"cannot write a checkpoint to {self._manager.directory} (step {step}): {reason}; the "
        "run stopped. The last checkpoint on disk is "
        f"{'step ' + str(kept) if kept is not None else 'none'}: free space or fix the folder, "
        "then run the same command again to resume")

  def _saved(self, state: dict[str, Any]) -> dict[str, Any]:
    return state if self.config.save_frozen else {k: v for k, v in state.items() if k != "frozen"}

  def save(self, step: int, state: dict[str, Any], data_iter: grain.DatasetIterator | None,
           force: bool = False) -> bool:
    """Saves if `step` is due (every_steps) or `force`; returns whether it did. Every process
    must call it at the same steps."""
    if not (force or self.due(step)):
      return False
    try:
      check_output_dir(str(self._manager.directory), "checkpoint folder")
    except UserError as e:
      raise self._write_failed(step, e) from None
    items = {"state": ocp.args.StandardSave(self._saved(state))}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self._saving = step
    try:
      # The decision is ours (`due`): Orbax's own policy also saves the first step it sees.
      return self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # Orbax and tensorstore raise OSError, ValueError, RuntimeError, ...
      raise self._write_failed(step, e) from None

  def restore(self, step: int, abstract_state: dict[str, Any],
              data_iter: grain.DatasetIterator | None) -> dict[str, Any]:
    """The saved state, restored onto the shardings in `abstract_state` (ShapeDtypeStructs); the
    data iterator is moved to its saved position in place. Without saved frozen weights, the
    result has no 'frozen' entry: the caller supplies it."""
    items = {"state": ocp.args.StandardRestore(self._saved(abstract_state))}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      # A checkpoint of another model, LoRA or trainable set than the config describes.
      raise UserError(f"{self._manager.directory}/{step} does not match this config's train state "
                      f"(another model, LoRA or optim.trainable?): {type(e).__name__}: "
                      f"{' '.join(str(e).split())[:300]}") from None
    return dict(restored["state"])

  def wait(self) -> None:
    """Blocks until background saves are on disk."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # a background save failed: see save
      raise self._write_failed(self._saving, e) from None

  def close(self) -> None:
    try:
      self._manager.close()
    except Exception as e:
      raise self._write_failed(self._saving, e) from None


def export_hf(model: nnx.Module, directory: str, dtype: str = "float32", tokenizer=None,
              data: DataConfig | None = None) -> None:
  """The model as an HF directory (adapters merged), with its tokenizer when given. Every process
  must call it; process 0 writes.

  `data`, the run's data config, makes the export prompt as the run trained: the tokenizer's chat
  template becomes the training template and system prompt (`text.chat_template`), so a
  template-reading caller (`generate --template auto`, `apply_chat_template`) renders the training
  prompt; for a LLaVA model it also writes `preprocessor_config.json` (a CLIPImageProcessor with
  the run's size and normalisation; LLaVA-NeXT: a LlavaNextImageProcessor with its pinpoints;
  Qwen2-VL: a Qwen2VLImageProcessor with its pixel budget) and `processor_config.json`, so
  `AutoProcessor` loads a `LlavaProcessor` (`LlavaNextProcessor`, `Qwen2VLProcessor`).
  CLIP's processor cannot pad to square: lvlm_jax reads the file back with LLaVA's padding
  (ImageProcessing.pad_to_square), transformers resizes and crops.
  """
  hf.save_hf(model, directory, dtype=dtype)
  if jax.process_index() != 0:
    return
  if tokenizer is not None:
    jinja = text.chat_template(data.template, data.system_prompt) if data is not None else None
    own = tokenizer.chat_template
    try:
      if jinja is not None:
        tokenizer.chat_template = jinja
      tokenizer.save_pretrained(directory)
    finally:
      tokenizer.chat_template = own
  if data is not None and isinstance(model, LVLM):
    _write_processor(model, data, directory)


def _write_processor(model: LVLM, data: DataConfig, directory: str) -> None:
  config = model.config
  if data.qwen2_vl is not None:
    _write_qwen2_vl_processor(data.qwen2_vl, directory)
    return
  # LLaVA-NeXT's processors tile at the model's pinpoints and count each image's tokens by size;
  # LLaVA-OneVision's also cap the features (vision_aspect_ratio) and size tiles as height x width.
  anyres = isinstance(config, LlavaNextConfig)
  onevision = isinstance(config, LlavaOnevisionConfig)
  image = data.image if data.anyres is None else data.anyres.tile
  kind = ("LlavaOnevisionProcessor" if onevision else
          "LlavaNextProcessor" if anyres else "LlavaProcessor")
  preprocessor = {
      "image_processor_type": ("LlavaOnevisionImageProcessor" if onevision else
                               "LlavaNextImageProcessor" if anyres else "CLIPImageProcessor"),
      "processor_class": kind,
      "do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": image.size},
      "resample": int(image.resample), "do_center_crop": True,
      "crop_size": {"height": image.size, "width": image.size}, "do_rescale": True,
      "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(image.mean),
      "image_std": list(image.std)}
  if anyres:
    preprocessor.update(image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
                        do_pad=True)
  if onevision:
    preprocessor.update(size={"height": image.size, "width": image.size}, do_center_crop=False,
                        crop_size=None)
  processor = {
      "processor_class": kind, "image_token": data.image_token,
      "vision_feature_select_strategy": config.vision_feature_select_strategy}
  if onevision:
    processor.update(num_image_tokens=config.tokens_per_tile,
                     vision_aspect_ratio=f"anyres_max_{config.max_feature_tiles}")
  else:
    # The tokens before the patches (CLIP's and DINOv2's class token, none in SigLIP).
    processor.update(patch_size=config.vision.patch_size,
                     num_additional_image_tokens=config.vision.num_prefix_tokens)
  for name, content in (("preprocessor_config.json", preprocessor),
                        ("processor_config.json", processor)):
    with open(os.path.join(directory, name), "w") as f:
      json.dump(content, f, indent=2)


def _write_qwen2_vl_processor(processing: Qwen2VLImageProcessing, directory: str) -> None:
  """Qwen2VLImageProcessor's files for the run's pixel budget and statistics (both spellings of
  the budget: transformers 4's min/max_pixels, 5's size), read back by
  Qwen2VLImageProcessing.for_model."""
  preprocessor = {
      "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
      "min_pixels": processing.min_pixels, "max_pixels": processing.max_pixels,
      "size": {"shortest_edge": processing.min_pixels, "longest_edge": processing.max_pixels},
      "patch_size": processing.patch_size, "temporal_patch_size": processing.temporal_patch_size,
      "merge_size": processing.merge_size, "resample": int(processing.resample),
      "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": list(processing.mean), "image_std": list(processing.std),
      "do_convert_rgb": True}
  for name, content in (("preprocessor_config.json", preprocessor),
                        ("processor_config.json", {"processor_class": "Qwen2VLProcessor"})):
    with open(os.path.join(directory, name), "w") as f:
      json.dump(content, f, indent=2)


def _to_host(array: jax.Array) -> np.ndarray:
  if not array.is_fully_addressable:
    array = multihost_utils.process_allgather(array, tiled=True)
  return np.asarray(jax.device_get(array), dtype=np.float32)


def _peft_prefix(model: nnx.Module, kernel_path: str) -> str:
  return "base_model.model." + hf.export_names(model)(kernel_path)[0].removesuffix(".weight")


def export_lora(model: nnx.Module, directory: str, base_model: str = "") -> list[str]:
  """The LoRA adapters alone, as PEFT writes them: `adapter_model.safetensors` (lora_A [r, in],
  lora_B [out, r], HF module names) + `adapter_config.json`. Returns the adapted module names.
  Every process must call it; process 0 writes."""
  tensors, modules, lora = {}, [], None
  for path, linear in linear_layers(model):
    if linear.lora is None:
      continue
    lora: LoRA = linear.lora
    prefix = _peft_prefix(model, path + ".kernel")
    tensors[prefix + ".lora_A.weight"] = _to_host(lora.lora_a[...]).T.copy()
    tensors[prefix + ".lora_B.weight"] = _to_host(lora.lora_b[...]).T.copy()
    modules.append(prefix.removeprefix("base_model.model."))
  if lora is None:
    return []
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    rank = int(np.shape(lora.lora_a[...])[1])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
              "lora_alpha": lora.scale * rank,
              "lora_dropout": lora.dropout.rate if lora.dropout is not None else 0.0,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
              "base_model_name_or_path": base_model, "bias": "none", "fan_in_fan_out": False}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2)
  return modules
