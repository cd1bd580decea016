"""CaD-VI (Lin et al. 2024, "Comparison Visual Instruction Tuning") as a pipeline of resumable
stages; see METHODS.md section 4.

  images       shapes world only: the phase-1 pairs (with both images' captions) and the phase-2
               pairs (with only their difference annotation, standing in for MIMIC-IT's scene
               differences), as PNG files and pairs1.jsonl / pairs2.jsonl
  eval_base    metrics of the starting model
  phase1_data  shapes world: from each phase-1 pair's two captions alone, a CaD summary (the
               phase-1 writer: `data/caption_pairs.py`, or any HF causal LM through the
               generation service, prompted with the paper's instruction) and binary
               image-selection instructions (one per image a caption sentence singles out);
               files: the given phase-1 data (CaD-Inst V1)
  phase1       CaD-LLaVA V1: the base data (the shapes tasks, standing in for LLaVA-665K, or
               data.base_conversations) + phase-1 data; LoRA, projector trained, vision frozen
  eval_phase1
  phase2_data  the phase-1 model re-annotates each phase-2 pair, prompted with both images and
               the difference-only annotation as context; its summaries are the phase-2 data
               (CaD-Inst V2), under the summary instruction; or the given phase-2 data
  phase2       CaD-LLaVA V2, again from the base: base data + phase-1 data x cad.phase1_repeats
               (the recipe lists it twice) + phase-2 data
  eval_phase2  each eval: pair_selection_accuracy / _exact_match and cad_summary_* on held-out
               pairs (eval/cad_summary.py), and the shapes metrics of `eval` (yes/no, ...)

Workdir: config.json, images/ (pairs*.jsonl, PNGs), data/{phase1,phase2}.jsonl, phase1/ and
phase2/ (SFT runs with export/hf), eval/<label>.json, summary.json. Artifacts appear under their
final names only when complete; generation resumes after its last complete batch, training
from its last checkpoint.
"""

import dataclasses
import os
import shutil

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import config_dict
from PIL import Image

from lvlm_jax import preemption
from lvlm_jax.artifacts import JsonlWriter, read_jsonl, write_jsonl
from lvlm_jax.data import caption_pairs, training_sources
from lvlm_jax.data.images import load_image, resolve_image_path
from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.data.shapes import (ScenePair, ShapesConfig, SFT_TASKS, caption, held_out_world,
                                  make_pair, render)
from lvlm_jax.data.tokenizer import load_tokenizer
from lvlm_jax.dataclass_config import help_field, method_defaults, method_help, parse_method
from lvlm_jax.errors import UserError
from lvlm_jax.eval.cad_summary import CadEvalConfig, PairEvaluator
from lvlm_jax.eval.shapes import ShapesEvalConfig, ShapesEvaluator
from lvlm_jax.methods import sft
from lvlm_jax.methods.pipeline import Pipeline, PipelineConfig, Stage
from lvlm_jax.models import building, hf
from lvlm_jax.sampling.service import GenerationConfig, GenerationService, Prompt
from lvlm_jax.sharding import MeshConfig, mesh_from_config
from lvlm_jax.training import checkpoint, loop, optim

# The paper's prompts (project page and METHODS.md 4.1-4.2).
PAPER_SUMMARY = ("Summarize the commonalities and differences about the visual content of the two "
                 "images, including the object types, object attributes, counting the objects, "
                 "object action, object locations, relative positions between objects, etc.")
PAPER_CONTEXT = ("Context: {context}\nBased on the two images and the context, summarize the "
                 "commonalities and differences about the visual content of the two images, "
                 "including the object types, object attributes, counting the objects, object "
                 "action, object locations, relative positions between objects, etc.")
IMAGES_PREFIX = "Image 1: <image>\nImage 2: <image>\n"
# The shapes worlds the pairs come from: neither the base model's training scenes (seed) nor the
# evaluation's (held_out_world).
_PHASE1_WORLD, _PHASE2_WORLD = 1, 2


@dataclasses.dataclass(frozen=True)
class CaDData:
  """The image pairs and instruction data; the shapes world or files."""
  source: str = help_field("shapes", "'shapes': pairs from the shapes world, phase-1 and phase-2 "
                           "data generated; 'files': the given base/phase-1/phase-2 files.")
  shapes: ShapesConfig = help_field(ShapesConfig(), "The shapes world (phase-1 pairs, phase-2 "
                                    "pairs and evaluation draw disjoint scenes from it).")
  phase1_pairs: int = help_field(1000, "Shapes pairs of phase 1 (CaD-Inst V1: 278K).")
  phase2_pairs: int = help_field(300, "Shapes pairs re-annotated in phase 2 (CaD-Inst V2: 71K).")
  base_tasks: tuple[tuple[str, int], ...] = help_field(
      (("caption", 500), ("yes_no", 500)), "Shapes tasks trained beside the CaD data, standing "
      f"in for LLaVA-665K (tasks from {SFT_TASKS}).")
  base_conversations: tuple[str, ...] = help_field((), "source='files': the base instruction "
                                                   "data (llava_v1_5_mix665k.json).")
  phase1_data: str = help_field("", "source='files': phase-1 data, LLaVA format with two images "
                                "(CaD-Inst phase1_instruct_data_278k.json).")
  phase2_data: str = help_field("", "source='files': phase-2 data (phase2_instruct_data_71k."
                                "json); '' generates it from phase2_pairs.")
  phase2_pairs_file: str = help_field("", "source='files': pairs to re-annotate in phase 2, JSONL "
                                      "of {id, images: [two paths], context: the difference "
                                      "annotation}.")
  image_roots: tuple[str, ...] = help_field((), "source='files': folders searched for the image "
                                            "paths of the files (comma-separated in the paper).")
  pipeline: DataConfig = help_field(DataConfig(max_images=2), "Batching of both trainings: "
                                    "template, lengths, workers, ...")

  def __post_init__(self):
    if self.source not in ("shapes", "files"):
      raise UserError(f"data.source={self.source!r} is not 'shapes' or 'files'")
    if self.pipeline.max_images < 2:
      raise UserError("data.pipeline.max_images must be at least 2 for image pairs")
    if self.source == "files":
      if not self.phase1_data or not os.path.exists(self.phase1_data):
        raise UserError(f"data.source='files' needs data.phase1_data: {self.phase1_data!r} does "
                        "not exist")
      given = [k for k in ("phase2_data", "phase2_pairs_file") if getattr(self, k)]
      if len(given) != 1 or not os.path.exists(getattr(self, given[0])):
        raise UserError("data.source='files' needs one existing file of data.phase2_data "
                        "(CaD-Inst V2) or data.phase2_pairs_file (pairs to re-annotate)")


@dataclasses.dataclass(frozen=True)
class CaDSettings:
  """The prompts, the phase-1 writer, phase-2 generation and the mixture."""
  summary_prompt: str = help_field(PAPER_SUMMARY, "The comparison instruction after "
                                   f"{IMAGES_PREFIX!r} (phase-1 LLM, training, evaluation).")
  context_prompt: str = help_field(PAPER_CONTEXT, "Phase 2's instruction after the images, "
                                   "{context} the pair's difference-only annotation.")
  selection_prompt: str = help_field(
      "{statement} Which image does the statement describe? Answer with 1 or 2.",
      "A binary image-selection instruction after the images, {statement} true of one image.")
  selection_answers: tuple[str, str] = help_field(("1", "2"), "Answers naming image 1 and 2.")
  phase1_writer: str = help_field("captions", "'captions': the shapes world's caption-only "
                                  "summariser (data/caption_pairs.py); else an HF causal LM "
                                  "directory that writes each summary from the two captions.")
  llm_prompt: str = help_field("Image 1: {caption_a}\nImage 2: {caption_b}\n{instruction}",
                               "What an LLM phase-1 writer reads ({instruction}: summary_prompt).")
  llm_generation: GenerationConfig = help_field(
      GenerationConfig(max_new_tokens=512, batch_size=8), "Generation of the LLM phase-1 writer.")
  generation: GenerationConfig = help_field(
      GenerationConfig(max_new_tokens=256, batch_size=32), "Phase 2's re-annotation (greedy, "
      "256 tokens: CaD-VI's evaluation decoding).")
  selections_per_image: int = help_field(1, "Selection instructions per image of a phase-1 "
                                         "pair (one per object sentence the other caption "
                                         "lacks, at most this many).")
  phase1_repeats: int = help_field(2, "Times the phase-1 data is in the final mixture (the recipe "
                                   "lists phase1_278k.json twice).")
  epochs: float = help_field(1.0, "Passes over each training mixture (CaD-VI: 1).")
  seed: int = help_field(0, "Seed of the selection statements.")

  def __post_init__(self):
    if "{statement}" not in self.selection_prompt or "{context}" not in self.context_prompt:
      raise UserError("cad.selection_prompt needs {statement} and cad.context_prompt {context}")
    if self.phase1_repeats < 1 or self.selections_per_image < 0 or self.epochs <= 0:
      raise UserError("cad.phase1_repeats must be >= 1, cad.selections_per_image >= 0 and "
                      "cad.epochs > 0")


@dataclasses.dataclass(frozen=True)
class CaDVIConfig:
  model: building.ModelConfig
  data: CaDData
  cad: CaDSettings
  optim: optim.OptimConfig
  train: loop.TrainConfig
  checkpoint: checkpoint.CheckpointConfig
  mesh: MeshConfig
  eval: ShapesEvalConfig
  cad_eval: CadEvalConfig
  pipeline: PipelineConfig = PipelineConfig()


SECTIONS = {"model": building.ModelConfig, "data": CaDData, "cad": CaDSettings,
            "optim": optim.OptimConfig, "train": loop.TrainConfig,
            "checkpoint": checkpoint.CheckpointConfig, "mesh": MeshConfig,
            "eval": ShapesEvalConfig, "cad_eval": CadEvalConfig, "pipeline": PipelineConfig}
# Set by the pipeline: the steps from the data size and the epochs, the pipeline from the model.
EXCLUDED = {"data": training_sources.DERIVED_PIPELINE_FIELDS, "train": ("num_steps",)}


def default_config() -> config_dict.ConfigDict:
  """Every CaD-VI setting at its default; config files start from this."""
  return method_defaults("cadvi", SECTIONS, EXCLUDED)


def config_help() -> list[str]:
  return method_help("cadvi", SECTIONS, EXCLUDED)


def parse(config: config_dict.ConfigDict | dict) -> CaDVIConfig:
  """The typed config; a UserError names any unknown key or bad value."""
  parsed = parse_method(CaDVIConfig, config)
  if not parsed.model.hf_dir:
    raise UserError("CaD-VI fine-tunes a model: set model.hf_dir (e.g. the quickstart export, "
                    "workdir/quickstart/export/hf)")
  for task, _ in parsed.data.base_tasks:
    if task not in SFT_TASKS:
      raise UserError(f"data.base_tasks: task {task!r} is not one of {SFT_TASKS}")
  return parsed


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[cadvi] {message}", flush=True)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"cadvi_{name}")


def _world(config: CaDVIConfig, offset: int) -> ShapesConfig:
  return dataclasses.replace(config.data.shapes, seed=config.data.shapes.seed + offset)


def context_annotation(pair: ScenePair) -> str:
  """A shapes pair's difference-only annotation: the differences part of its summary."""
  return "Differences: " + pair.summary.split(" Differences: ", 1)[1]


def write_shapes_pairs(config: CaDVIConfig, directory: str) -> None:
  """directory/pairs1.jsonl ({id, images, captions}), pairs2.jsonl ({id, images, context}) and
  their PNGs, like a real dataset (image paths relative to `directory`)."""
  tmp = directory + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  size = config.data.shapes.image_size
  for name, offset, count in (("pairs1", _PHASE1_WORLD, config.data.phase1_pairs),
                              ("pairs2", _PHASE2_WORLD, config.data.phase2_pairs)):
    os.makedirs(os.path.join(tmp, name))
    world, records = _world(config, offset), []
    for i in range(count):
      pair = make_pair(world, i)
      paths = [f"{name}/{i:06d}_{k}.png" for k in (1, 2)]
      for path, scene in zip(paths, (pair.scene_a, pair.scene_b)):
        Image.fromarray(render(scene, size)).save(os.path.join(tmp, path))
      record = {"id": f"{name}-{i}", "images": paths}
      if name == "pairs1":
        record["captions"] = [caption(pair.scene_a), caption(pair.scene_b)]
      else:
        record["context"] = context_annotation(pair)
      records.append(record)
    write_jsonl(os.path.join(tmp, f"{name}.jsonl"), records)
  os.replace(tmp, directory)


def _conversation(record_id: str, images: list[str], question: str, answer: str) -> dict:
  return {"id": record_id, "image": images,
          "conversations": [{"from": "human", "value": IMAGES_PREFIX + question},
                            {"from": "gpt", "value": answer}]}


def selection_records(pair: dict, settings: CaDSettings, index: int) -> list[dict]:
  """The binary image-selection instructions of a phase-1 pair, from its captions: up to
  settings.selections_per_image about each image whose caption states objects the other
  lacks, so that the same two images come with both answers."""
  out = []
  captions = pair["captions"]
  for target in (1, 2):
    options = caption_pairs.distinguishing_sentences(captions[target - 1], captions[2 - target])
    order = np.random.default_rng([settings.seed, index, target]).permutation(len(options))
    for k, i in enumerate(order[:settings.selections_per_image]):
      out.append(_conversation(f"{pair['id']}-select{target}" + (f"-{k}" if k else ""),
                               pair["images"],
                               settings.selection_prompt.format(statement=options[i]),
                               settings.selection_answers[target - 1]))
  return out


def _llm_summaries(settings: CaDSettings, pairs: list[dict], path: str, mesh) -> list[str]:
  """One summary per pair from an HF causal LM (settings.phase1_writer) reading the two
  captions, through the generation service, resumable by batch at `path`."""
  import transformers
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(settings.phase1_writer)
  except (OSError, ValueError) as e:
    raise UserError(f"cad.phase1_writer: cannot load a tokenizer from "
                    f"{settings.phase1_writer}: {e}") from None
  model = hf.load_model(settings.phase1_writer, mesh=mesh)
  data = DataConfig(template="tokenizer", system_prompt=None, max_images=0)
  size = settings.llm_generation.batch_size
  service = GenerationService(model, tokenizer, data, mesh, size, progress=True)
  sampling = settings.llm_generation.sampling(tokenizer)
  writer = JsonlWriter(path, size)
  start = writer.resume()
  for first in range(start, len(pairs), size):
    preemption.check()
    chunk = pairs[first:first + size]
    prompts = [Prompt.question(settings.llm_prompt.format(
        caption_a=p["captions"][0], caption_b=p["captions"][1],
        instruction=settings.summary_prompt)) for p in chunk]
    writer.append([{"id": p["id"], "summary": s}
                   for p, s in zip(chunk, service.texts(prompts, sampling))])
  writer.close()
  return [r["summary"] for r in read_jsonl(path)]


def write_phase1_data(config: CaDVIConfig, pairs_path: str, out: str, mesh) -> None:
  """Phase-1 instruction data at `out`: per pair a CaD summary from its captions alone and its
  binary image-selection instructions."""
  settings = config.cad
  pairs = read_jsonl(pairs_path)
  if settings.phase1_writer == "captions":
    summaries = [caption_pairs.summarize(*p["captions"]) for p in pairs]
  else:
    summaries = _llm_summaries(settings, pairs, out + ".llm.jsonl", mesh)
  records = []
  for i, (pair, summary) in enumerate(zip(pairs, summaries)):
    records.append(_conversation(pair["id"] + "-summary", pair["images"],
                                 settings.summary_prompt, summary))
    records += selection_records(pair, settings, i)
  write_jsonl(out, records)


def reannotate(service: GenerationService, settings: CaDSettings, pairs: list[dict],
               roots: tuple[str, ...], path: str) -> None:
  """Phase-2 data at `path`: the model's summary of each pair, prompted with both images and
  the pair's difference-only annotation as context, stored under the summary instruction;
  resumable by batch."""
  size = service.batch_size
  sampling = settings.generation.sampling(service.tokenizer)
  writer = JsonlWriter(path, size)
  start = writer.resume()
  if start:
    _log(f"phase2_data: resuming after {start} of {len(pairs)} pairs")
  for first in range(start, len(pairs), size):
    preemption.check()
    chunk = pairs[first:first + size]
    prompts = [Prompt.question(IMAGES_PREFIX + settings.context_prompt.format(
        context=p["context"]), tuple(load_image(resolve_image_path(i, roots))
                                     for i in p["images"])) for p in chunk]
    texts = service.texts(prompts, sampling, desc="phase2_data")
    writer.append([_conversation(p["id"] + "-summary", p["images"], settings.summary_prompt, t)
                   for p, t in zip(chunk, texts)])
    _log(f"phase2_data: {min(first + size, len(pairs))}/{len(pairs)}")
  writer.close()


def _pipeline_data(config: CaDVIConfig, model, hf_dir: str, batch: int) -> DataConfig:
  return training_sources.pipeline_config(config.data, model, hf_dir, batch)


def pair_metrics(model, tokenizer, data: DataConfig, config: CaDVIConfig, mesh) -> dict:
  """The CaD-VI metrics of `model` on held-out shapes pairs (eval/cad_summary.py)."""
  if not config.cad_eval.enabled:
    return {}
  evaluator = PairEvaluator(
      tokenizer, data, held_out_world(config.data.shapes), config.cad_eval,
      summary_prompt=IMAGES_PREFIX + config.cad.summary_prompt,
      selection_prompt=IMAGES_PREFIX + config.cad.selection_prompt,
      answers=config.cad.selection_answers, mesh=mesh)
  return evaluator(model)


def evaluate(config: CaDVIConfig, hf_dir: str, tokenizer, mesh) -> dict[str, float]:
  """What `python -m lvlm_jax.evaluate --model hf_dir --config <this config>` reports: the
  CaD-VI pair metrics and the shapes metrics of config.eval."""
  model = hf.load_model(hf_dir, mesh=mesh, dtype=config.model.dtype,
                        param_dtype=config.model.param_dtype)
  data = _pipeline_data(config, model, hf_dir, config.cad_eval.batch_size)
  metrics = pair_metrics(model, tokenizer, data, config, mesh)
  if config.eval.enabled:
    evaluator = ShapesEvaluator(tokenizer, data, held_out_world(config.data.shapes),
                                config.eval, mesh)
    with jax.set_mesh(mesh):
      metrics.update(evaluator(model))
  return metrics


def _training_data(config: CaDVIConfig, files: tuple[str, ...], repeats: tuple[int, ...],
                   roots: tuple[str, ...]) -> training_sources.DataSources:
  data = config.data
  return training_sources.DataSources(
      shapes_tasks=data.base_tasks if data.source == "shapes" else (), shapes=data.shapes,
      conversations=data.base_conversations + files,
      conversation_repeats=(1,) * len(data.base_conversations) + repeats,
      image_roots=roots, pipeline=data.pipeline)


def _steps(data: training_sources.DataSources, epochs: float, batch_size: int) -> int:
  return max(1, round(len(training_sources.training_source(data)) * epochs / batch_size))


def run(config: CaDVIConfig, workdir: str, *, raw_config: config_dict.ConfigDict | None = None,
        stop_at: dict[str, int] | None = None) -> dict:
  """Runs (or resumes) every stage in `workdir` (methods/pipeline.py); returns the summary (also
  summary.json). stop_at: {"phase1": step} or {"phase2": step} stops that training there as a
  preemption would (tests)."""
  stop_at = stop_at or {}
  mesh = mesh_from_config(config.mesh)
  tokenizer = load_tokenizer(config.model, (config.data.pipeline.grounding_prompt,))
  shapes = config.data.source == "shapes"
  images = os.path.join(workdir, "images")
  roots = (images,) if shapes else config.data.image_roots
  data_dir = os.path.join(workdir, "data")
  phase1_data = os.path.join(data_dir, "phase1.jsonl") if shapes else config.data.phase1_data
  phase2_data = config.data.phase2_data or os.path.join(data_dir, "phase2.jsonl")
  pairs2 = os.path.join(images, "pairs2.jsonl") if shapes else config.data.phase2_pairs_file
  exports = {name: os.path.join(workdir, name, "export", "hf") for name in ("phase1", "phase2")}

  def write_images():
    if not os.path.isdir(images):
      _log("images: writing the shapes-world pairs")
      if jax.process_index() == 0:
        write_shapes_pairs(config, images)
      _sync("images")
    return "done"

  def evaluation(hf_dir: str):
    def stage():
      if not (config.eval.enabled or config.cad_eval.enabled):
        return None
      return {"model": hf_dir, **evaluate(config, hf_dir, tokenizer, mesh)}
    return stage

  def phase1_records():
    if not os.path.exists(phase1_data):
      if jax.process_index() == 0 or config.cad.phase1_writer != "captions":
        write_phase1_data(config, os.path.join(images, "pairs1.jsonl"), phase1_data, mesh)
      _sync("phase1_data")
    return "done"

  def training(name: str, files: tuple[str, ...], repeats: tuple[int, ...]):
    def stage():
      data = _training_data(config, files, repeats, roots)
      steps = _steps(data, config.cad.epochs, config.train.batch_size)
      sft_config = sft.SFTConfig(
          model=config.model, data=data, optim=config.optim,
          train=dataclasses.replace(config.train, num_steps=steps),
          checkpoint=dataclasses.replace(config.checkpoint, export_hf=True), mesh=config.mesh,
          eval=ShapesEvalConfig(yes_no=0, grounding=0, captions=0))
      return sft.train_stage(sft_config, os.path.join(workdir, name), tokenizer, mesh,
                             stop_at.get(name), summary_file="summary.json")
    return stage

  def phase2_records():
    if not os.path.exists(phase2_data):
      model = hf.load_model(exports["phase1"], mesh=mesh, dtype=config.model.dtype,
                            param_dtype=config.model.param_dtype)
      data = _pipeline_data(config, model, exports["phase1"], config.cad.generation.batch_size)
      service = GenerationService(model, tokenizer, data, mesh,
                                  config.cad.generation.batch_size, progress=True)
      reannotate(service, config.cad, read_jsonl(pairs2), roots, phase2_data)
    return "done"

  stages = [Stage("images", write_images)] if shapes else []
  stages += [Stage("eval_base", evaluation(config.model.hf_dir), eval_label="base",
                   model=config.model.hf_dir)]
  if shapes:
    stages.append(Stage("phase1_data", phase1_records))
  stages += [Stage("phase1", training("phase1", (phase1_data,), (1,))),
             Stage("eval_phase1", evaluation(exports["phase1"]), eval_label="phase1",
                   model=exports["phase1"])]
  if not config.data.phase2_data:
    stages.append(Stage("phase2_data", phase2_records))
  stages += [Stage("phase2", training("phase2", (phase1_data, phase2_data),
                                      (config.cad.phase1_repeats, 1))),
             Stage("eval_phase2", evaluation(exports["phase2"]), eval_label="phase2",
                   model=exports["phase2"])]
  return Pipeline("cadvi", workdir, stages, config.pipeline, raw_config, config).run()
