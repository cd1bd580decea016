"""STIC (Deng et al. 2024, "Enhancing Large Vision Language Models with Self-Training on Image
Comprehension") as a pipeline of resumable stages; see METHODS.md section 2.

  images       shapes world only: the unlabeled images and the SFT subset, as PNG files
  eval_base    metrics of the starting model
  preferences  stage-1 data from unlabeled images. chosen: the description under the detailed
               prompt on the clean image. rejected: with probability misleading_prob a misleading
               prompt on the clean image, else the stored prompt on a corrupted image (the
               released code forgets to corrupt it; here it is corrupted). Stored prompt: a random
               simple prompt for both.
  reference    with dpo.reference='precomputed': the starting model's log-probs of every pair
  dpo          stage 1: DPO + NLL on chosen; LoRA on the LLM, projector trained, vision frozen
  eval_dpo
  describe     the DPO model describes each SFT image under a random simple prompt; the first
               question becomes "Image description:\\n{d}\\n\\n{q}" (eval/dar.py's `infuse`)
  sft          stage 2: description-infused SFT, from the DPO model (adapters merged, new ones)
  eval_sft     each eval: the shapes-world metrics `python -m lvlm_jax.evaluate` computes, plus
               yes/no accuracy with Describe-and-Respond

Workdir: config.json, images/, preferences/{preferences,preferences.ref}.jsonl, dpo/ (a DPO run),
sft_data/{descriptions,infused}.jsonl, sft/ (an SFT run), eval/<stage>.json, summary.json.
Every artifact appears under its final name only when complete, and a rerun skips finished
stages: generation resumes after its last complete batch, training from its last checkpoint.
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
from lvlm_jax.artifacts import JsonlWriter, read_json, read_jsonl, write_json, write_jsonl
from lvlm_jax.data import training_sources
from lvlm_jax.data.images import color_jitter, load_image, low_resolution, resolve_image_path
from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.data.shapes import TASKS, ShapesConfig, ShapesSource, held_out_world, make_scene
from lvlm_jax.data.sources import ConversationSource
from lvlm_jax.data.tokenizer import load_tokenizer
from lvlm_jax.dataclass_config import help_field, method_defaults, method_help, parse_method
from lvlm_jax.errors import UserError
from lvlm_jax.eval import dar, preference_quality
from lvlm_jax.eval.shapes import ShapesEvalConfig, ShapesEvaluator
from lvlm_jax.methods import dpo as dpo_run
from lvlm_jax.methods import sft
from lvlm_jax.methods.pipeline import Pipeline, PipelineConfig, Stage
from lvlm_jax.models import building, hf
from lvlm_jax.sampling.service import GenerationConfig, GenerationService, Prompt
from lvlm_jax.sharding import MeshConfig, mesh_from_config
from lvlm_jax.training import checkpoint, loop, optim
from lvlm_jax.training.dpo import DPOConfig, write_reference_logps

PROMPT_KINDS = ("detailed", "misleading", "simple", "describe")
PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
# The shapes scenes STIC sees are neither the starting model's training scenes (world seed) nor
# the evaluation's (seed + 10_000, held_out_world).
_UNLABELED_WORLD, _SFT_WORLD = 1, 2


@dataclasses.dataclass(frozen=True)
class STICData:
  """The images STIC describes and the SFT subset it infuses; the shapes world or files."""
  source: str = help_field("shapes", "'shapes': images and SFT subset from the shapes world; "
                           "'files': unlabeled_list, sft_conversations and image_root.")
  shapes: ShapesConfig = help_field(ShapesConfig(), "The shapes world (unlabeled images, SFT "
                                    "subset and evaluation draw disjoint scenes from it).")
  num_unlabeled: int = help_field(6000, "Unlabeled images for the preference data (STIC: 6k COCO "
                                  "train2014); with source='files', the first this many of "
                                  "unlabeled_list (0: all).")
  unlabeled_list: str = help_field("", "source='files': JSON list of image paths relative to "
                                   "image_root (STIC's data/6k_coco_names.json).")
  sft_tasks: tuple[tuple[str, int], ...] = help_field(
      (("caption", 2000), ("yes_no", 2000), ("grounding", 1000)), "Shapes-world SFT subset as "
      f"(task, records) pairs, tasks from {TASKS[:3]} (STIC: 5k samples of LLaVA's SFT mix).")
  sft_conversations: str = help_field("", "source='files': LLaVA-format SFT subset (STIC's "
                                      "mixed_5k.json), image paths relative to image_root.")
  image_root: str = help_field("", "source='files': the folder the image paths of unlabeled_list "
                               "and sft_conversations are relative to.")
  pipeline: DataConfig = help_field(DataConfig(), "Batching of both trainings: template, "
                                    "lengths, workers, ...")

  def __post_init__(self):
    if self.source not in ("shapes", "files"):
      raise UserError(f"data.source={self.source!r} is not 'shapes' or 'files'")
    if self.source == "files":
      for key in ("unlabeled_list", "sft_conversations", "image_root"):
        if not getattr(self, key) or not os.path.exists(getattr(self, key)):
          raise UserError(f"data.source='files' needs data.{key}: {getattr(self, key)!r} does "
                          "not exist")


@dataclasses.dataclass(frozen=True)
class STICSettings:
  """How the preference data and the infused SFT data are generated."""
  prompts: str = help_field("shapes", "Prompt set: 'shapes', 'paper' (STIC's own lists) or a "
                            f"folder holding {', '.join(k + '.txt' for k in PROMPT_KINDS)}, "
                            "one prompt per line.")
  misleading_prob: float = help_field(0.5, "Share of rejected answers from a misleading prompt on "
                                      "the clean image; the others come from a "
                                      "corrupted image (STIC: 0.5).")
  low_resolution_side: int = help_field(20, "Corruption 1 (half of the corrupted images): shorter "
                                        "side down to this many pixels and back "
                                        "(STIC: T.Resize(20)).")
  brightness: float = help_field(0.5, "Corruption 2: ColorJitter brightness (STIC: 0.5).")
  hue: float = help_field(0.3, "Corruption 2: ColorJitter hue (STIC: 0.3).")
  generation: GenerationConfig = help_field(
      GenerationConfig(do_sample=True, temperature=0.2, max_new_tokens=1024, batch_size=8),
      "Generation of every answer (STIC: sampling at temperature 0.2, up to 1024 tokens).")
  dpo_epochs: float = help_field(1.0, "Passes over the preference pairs in stage 1 (STIC: 1).")
  sft_epochs: float = help_field(1.0, "Passes over the infused SFT data in stage 2 (STIC: 1).")
  seed: int = help_field(42, "Seed of the prompt and corruption draws and of the sampling.")
  dar_eval: bool = help_field(True, "Also measure yes/no accuracy with Describe-and-Respond.")
  pair_filter: str = help_field(
      "none", "'none': DPO on every pair (STIC). 'oracle': only the pairs whose chosen answer is "
      "truly better than the rejected one against the scene's ground truth (shapes world only; "
      "an upper bound that no real run has, not STIC).")

  def __post_init__(self):
    if self.pair_filter not in ("none", "oracle"):
      raise UserError(f"stic.pair_filter={self.pair_filter!r} is not 'none' or 'oracle'")
    if not 0 <= self.misleading_prob <= 1:
      raise UserError(f"stic.misleading_prob={self.misleading_prob} must be in [0, 1]")
    if self.dpo_epochs <= 0 or self.sft_epochs <= 0:
      raise UserError("stic.dpo_epochs and stic.sft_epochs must be > 0")


@dataclasses.dataclass(frozen=True)
class STICConfig:
  model: building.ModelConfig
  data: STICData
  stic: STICSettings
  dpo: DPOConfig
  dpo_optim: optim.OptimConfig
  dpo_train: loop.TrainConfig
  sft_optim: optim.OptimConfig
  sft_train: loop.TrainConfig
  checkpoint: checkpoint.CheckpointConfig
  mesh: MeshConfig
  eval: ShapesEvalConfig
  pipeline: PipelineConfig = PipelineConfig()


SECTIONS = {"model": building.ModelConfig, "data": STICData, "stic": STICSettings, "dpo": DPOConfig,
            "dpo_optim": optim.OptimConfig, "dpo_train": loop.TrainConfig,
            "sft_optim": optim.OptimConfig, "sft_train": loop.TrainConfig,
            "checkpoint": checkpoint.CheckpointConfig, "mesh": MeshConfig,
            "eval": ShapesEvalConfig, "pipeline": PipelineConfig}
# Set by the pipeline: the steps from the data size and the epochs, the pipeline from the model.
EXCLUDED = {"data": training_sources.DERIVED_PIPELINE_FIELDS + ("pipeline.with_ref_logps",),
            "dpo_train": ("num_steps",), "sft_train": ("num_steps",)}


def default_config() -> config_dict.ConfigDict:
  """Every STIC setting at its default; config files start from this."""
  return method_defaults("stic", SECTIONS, EXCLUDED)


def config_help() -> list[str]:
  return method_help("stic", SECTIONS, EXCLUDED)


def parse(config: config_dict.ConfigDict | dict) -> STICConfig:
  """The typed config; a UserError names any unknown key or bad value."""
  parsed = parse_method(STICConfig, config)
  if not parsed.model.hf_dir:
    raise UserError("STIC improves a trained model: set model.hf_dir (e.g. the quickstart "
                    "export, workdir/quickstart/export/hf)")
  for task, _ in parsed.data.sft_tasks:
    if task not in TASKS[:3]:
      raise UserError(f"data.sft_tasks: task {task!r} is not one of {TASKS[:3]}")
  load_prompts(parsed.stic.prompts)
  return parsed


def load_prompts(prompts: str) -> dict[str, list[str]]:
  """{kind: [prompt, ...]} of a prompt set; 'detailed' and 'describe' hold one prompt each."""
  folder = os.path.join(PROMPTS_DIR, f"stic_{prompts}") if prompts in ("shapes", "paper") else prompts
  out = {}
  for kind in PROMPT_KINDS:
    path = os.path.join(folder, kind + ".txt")
    try:
      with open(path) as f:
        out[kind] = [line.strip() for line in f if line.strip()]
    except OSError as e:
      raise UserError(f"stic.prompts: cannot read {path}: {e.strerror}") from None
    if not out[kind] or (kind in ("detailed", "describe") and len(out[kind]) != 1):
      raise UserError(f"{path}: needs {'one prompt' if kind in ('detailed', 'describe') else 'prompts'}, "
                      "one per line")
  return out


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[stic] {message}", flush=True)


def _world(config: STICConfig, offset: int) -> ShapesConfig:
  return dataclasses.replace(config.data.shapes, seed=config.data.shapes.seed + offset)


def _save_png(image: np.ndarray, path: str) -> None:
  Image.fromarray(image).save(path)


def write_shapes_images(config: STICConfig, directory: str) -> None:
  """The shapes world's unlabeled images and SFT subset as files, like a real dataset:
  directory/unlabeled.json (image paths), directory/sft.jsonl (LLaVA records), PNGs beside."""
  tmp = directory + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, "unlabeled"))
  os.makedirs(os.path.join(tmp, "sft"))
  names = []
  for record in ShapesSource(_world(config, _UNLABELED_WORLD), "unlabeled",
                             config.data.num_unlabeled):
    names.append(f"unlabeled/{len(names):06d}.png")
    _save_png(record["images"][0], os.path.join(tmp, names[-1]))
  records = []
  pipeline = config.data.pipeline
  for task, count in config.data.sft_tasks:
    source = ShapesSource(_world(config, _SFT_WORLD), task, count)
    if task == "grounding":
      source = training_sources.GroundingAsConversation(source, pipeline.grounding_prompt, pipeline.box_format)
    for i in range(len(source)):
      record = source[i]
      name = f"sft/{task}_{i:06d}.png"
      _save_png(record["images"][0], os.path.join(tmp, name))
      records.append({"id": record["id"], "image": name, "conversations": record["conversations"]})
  write_json(os.path.join(tmp, "unlabeled.json"), names)
  write_jsonl(os.path.join(tmp, "sft.jsonl"), records)
  os.replace(tmp, directory)


class Inputs:
  """Where a run's images and SFT subset are: image paths relative to `root`."""

  def __init__(self, config: STICConfig, workdir: str):
    data = config.data
    if data.source == "files":
      self.root, self.sft_path = data.image_root, data.sft_conversations
      try:
        names = read_json(data.unlabeled_list)
      except ValueError as e:
        raise UserError(f"{data.unlabeled_list}: not valid JSON ({e})") from None
      if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{data.unlabeled_list}: expected a JSON list of image paths")
      self.unlabeled = names[:data.num_unlabeled or None]
    else:
      self.root = os.path.join(workdir, "images")
      self.sft_path = os.path.join(self.root, "sft.jsonl")
      if not os.path.isdir(self.root):
        _log("images: writing the shapes-world images")
        if jax.process_index() == 0:
          write_shapes_images(config, self.root)
        _sync("images")
      self.unlabeled = read_json(os.path.join(self.root, "unlabeled.json"))

  def image(self, path: str) -> np.ndarray:
    """uint8 [H, W, 3] of an image path relative to the root."""
    return load_image(resolve_image_path(path, (self.root,)))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"stic_{name}")


def corrupt(image: np.ndarray, rng: np.random.Generator, settings: STICSettings
            ) -> tuple[np.ndarray, str]:
  """STIC's `load_image` corruption with its two branches at probability 0.5: (image, name)."""
  if rng.random() < 0.5:
    return low_resolution(image, rng, settings.low_resolution_side), "low_resolution"
  return color_jitter(image, rng, settings.brightness, settings.hue), "color_jitter"


def pair_plan(index: int, image: np.ndarray, prompts: dict[str, list[str]],
              settings: STICSettings) -> dict:
  """The draws of preference pair `index` (a pure function of the seed and the index): the stored
  simple prompt, and the rejected answer's prompt and input image."""
  rng = np.random.default_rng([settings.seed, index])
  stored = prompts["simple"][rng.integers(len(prompts["simple"]))]
  if rng.random() < settings.misleading_prob:
    return {"prompt": stored, "rejected_prompt": prompts["misleading"][
        rng.integers(len(prompts["misleading"]))], "rejected_image": image,
            "rejected_kind": "misleading_prompt", "corruption": None}
  corrupted, name = corrupt(image, rng, settings)
  return {"prompt": stored, "rejected_prompt": stored, "rejected_image": corrupted,
          "rejected_kind": "corrupted_image", "corruption": name}


def _batch_key(seed: int, batch: int, part: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), batch), part)


def _answers(service: GenerationService, settings: STICSettings, images: list[np.ndarray],
             questions: list[str], key: jax.Array) -> list[str]:
  """One answer per (image, question), generated as `settings.generation` says."""
  sampling = settings.generation.sampling(service.tokenizer)
  return service.texts([Prompt.question(q, (i,)) for i, q in zip(images, questions)], sampling,
                       key)


def generate_preferences(service: GenerationService, inputs: Inputs, prompts: dict[str, list[str]],
                         settings: STICSettings, path: str, image_token: str) -> None:
  """Stage-1 pairs to `path` (flat preference JSONL, STIC's fields), resumable by batch."""
  size = service.batch_size
  writer = JsonlWriter(path, size)
  start = writer.resume()
  if start:
    _log(f"preferences: resuming after {start} of {len(inputs.unlabeled)} pairs")
  for first in range(start, len(inputs.unlabeled), size):
    preemption.check()
    names = inputs.unlabeled[first:first + size]
    images = [inputs.image(n) for n in names]
    plans = [pair_plan(first + i, image, prompts, settings) for i, image in enumerate(images)]
    batch = first // size
    chosen = _answers(service, settings, images, prompts["detailed"] * len(names),
                      _batch_key(settings.seed, batch, 0))
    rejected = _answers(service, settings, [p["rejected_image"] for p in plans],
                        [p["rejected_prompt"] for p in plans], _batch_key(settings.seed, batch, 1))
    writer.append([{"id": name, "image": name, "prompt": f"{image_token}\n{plan['prompt']}",
                    "chosen": c, "rejected": r, "rejected_kind": plan["rejected_kind"],
                    "rejected_prompt": plan["rejected_prompt"], "corruption": plan["corruption"]}
                   for name, plan, c, r in zip(names, plans, chosen, rejected)])
    _log(f"preferences: {min(first + size, len(inputs.unlabeled))}/{len(inputs.unlabeled)}")
  writer.close()


def infuse_sft_data(service: GenerationService, inputs: Inputs, prompts: dict[str, list[str]],
                    settings: STICSettings, directory: str, image_token: str) -> str:
  """Descriptions of the SFT subset's images (a random simple prompt each, resumable by batch),
  then the infused conversations: directory/infused.jsonl (returned)."""
  source = ConversationSource(inputs.sft_path, (inputs.root,))
  records = [source[i] for i in range(len(source))]
  described = [i for i, r in enumerate(records) if len(r["images"]) == 1]
  size = service.batch_size
  writer = JsonlWriter(os.path.join(directory, "descriptions.jsonl"), size)
  start = writer.resume()
  if start:
    _log(f"describe: resuming after {start} of {len(described)} descriptions")
  for first in range(start, len(described), size):
    preemption.check()
    chunk = described[first:first + size]
    questions = [prompts["simple"][np.random.default_rng([settings.seed, 1, i]).integers(
        len(prompts["simple"]))] for i in chunk]
    images = [load_image(records[i]["images"][0]) for i in chunk]
    texts = _answers(service, settings, images, questions,
                     _batch_key(settings.seed + 1, first // size, 0))
    writer.append([{"id": records[i]["id"], "prompt": q, "description": d}
                   for i, q, d in zip(chunk, questions, texts)])
    _log(f"describe: {min(first + size, len(described))}/{len(described)}")
  writer.close()
  descriptions = {d["id"]: d["description"] for d in read_jsonl(writer.path)}
  out = os.path.join(directory, "infused.jsonl")
  infused = []
  for r in records:
    turns = r["conversations"]
    if r["id"] in descriptions:
      turns = dar.infuse(turns, descriptions[r["id"]], image_token)
    infused.append({"id": r["id"], "conversations": turns,
                    "images": [os.path.relpath(p, inputs.root) for p in r["images"]]})
  write_jsonl(out, infused)
  return out


def pair_quality_rows(config: STICConfig, inputs: Inputs, pairs: list[dict]) -> list[dict]:
  """Each pair judged against its unlabeled scene (`eval/preference_quality.py`): id, the kind
  of rejected answer (misleading_prompt, low_resolution, color_jitter), both answers' counts and
  the verdict."""
  world = _world(config, _UNLABELED_WORLD)
  index = {name: i for i, name in enumerate(inputs.unlabeled)}
  rows = []
  for pair in pairs:
    scene = make_scene(world, index[pair["image"]])  # unlabeled record i shows scene i
    rows.append({"id": pair["id"], "kind": pair["corruption"] or pair["rejected_kind"],
                 **preference_quality.pair_quality(pair["chosen"], pair["rejected"], scene)})
  return rows


def _quality_table(summary: dict[str, dict[str, float]]) -> str:
  columns = ("pairs", "chosen_better", "chosen_worse", "chosen_tie", "chosen_mixed",
             "chosen_chair_i", "rejected_chair_i", "chosen_recall", "rejected_recall")
  lines = ["  " + " ".join(f"{c:>16}" for c in ("rejected kind",) + columns)]
  for kind, row in summary.items():
    lines.append("  " + f"{kind:>16} " + " ".join(
        f"{row[c]:>16d}" if c == "pairs" else f"{row[c]:>16.3f}" for c in columns))
  return "\n".join(lines)


def _load(config: STICConfig, hf_dir: str, mesh):
  """The model in `hf_dir` on the mesh, and the pipeline config its inputs need."""
  model = hf.load_model(hf_dir, mesh=mesh, allow_pickle=config.model.allow_pickle,
                        dtype=config.model.dtype, param_dtype=config.model.param_dtype)
  data = training_sources.pipeline_config(config.data, model, hf_dir,
                               config.stic.generation.batch_size)
  return model, data


def evaluate(config: STICConfig, hf_dir: str, tokenizer, prompts, mesh) -> dict[str, float]:
  """The metrics of `python -m lvlm_jax.evaluate --model hf_dir --config <this config>` (a
  held-out shapes world), plus dar_yes_no_accuracy."""
  model, data = _load(config, hf_dir, mesh)
  evaluator = ShapesEvaluator(tokenizer, data, held_out_world(config.data.shapes),
                              config.eval, mesh)
  with jax.set_mesh(mesh):
    metrics = evaluator(model)
  if config.stic.dar_eval and evaluator.yes_no:
    greedy = GenerationConfig(max_new_tokens=config.eval.caption_tokens,
                              batch_size=config.eval.batch_size)
    service = GenerationService(model, tokenizer, data, mesh, greedy.batch_size)
    metrics["dar_yes_no_accuracy"], _ = dar.dar_yes_no_accuracy(
        evaluator, model, service, greedy.sampling(tokenizer), prompts["describe"][0])
  return metrics


def _records(path: str) -> int:
  with open(path) as f:
    return sum(1 for line in f if line.strip())


def _service(config: STICConfig, model, tokenizer, data, mesh) -> GenerationService:
  return GenerationService(model, tokenizer, data, mesh, config.stic.generation.batch_size,
                           progress=True)


def run(config: STICConfig, workdir: str, *, raw_config: config_dict.ConfigDict | None = None,
        stop_at: dict[str, int] | None = None) -> dict:
  """Runs (or resumes) every stage in `workdir` (methods/pipeline.py); returns the summary (also
  summary.json).

  stop_at: {"dpo": step} or {"sft": step} stops that training there as a preemption would (tests).
  Each stage loads the model it needs and drops it when it ends.
  """
  stop_at = stop_at or {}
  mesh = mesh_from_config(config.mesh)
  prompts = load_prompts(config.stic.prompts)
  tokenizer = load_tokenizer(config.model, (config.data.pipeline.grounding_prompt,))
  image_token = config.data.pipeline.image_token
  prefs_dir = os.path.join(workdir, "preferences")
  prefs = os.path.join(prefs_dir, "preferences.jsonl")
  quality = os.path.join(prefs_dir, "quality.jsonl")
  oracle = config.stic.pair_filter == "oracle"
  # The pairs DPO trains on (and their reference log-probs).
  pairs = os.path.join(prefs_dir, "preferences.oracle.jsonl") if oracle else prefs
  with_ref = pairs.removesuffix(".jsonl") + ".ref.jsonl"
  shapes = config.data.source == "shapes"
  if oracle and not shapes:
    raise UserError("stic.pair_filter='oracle' reads the shapes world's ground truth; "
                    "data.source='files' has none")
  precomputed = config.dpo.reference == "precomputed"
  dpo_dir, sft_dir = os.path.join(workdir, "dpo"), os.path.join(workdir, "sft")
  dpo_export = os.path.join(dpo_dir, "export", "hf")
  sft_export = os.path.join(sft_dir, "export", "hf")
  sft_data = os.path.join(workdir, "sft_data")
  infused = os.path.join(sft_data, "infused.jsonl")
  inputs = []  # the stage `images` fills it; later stages read it

  def images():
    inputs[:] = [Inputs(config, workdir)]
    return "done"

  def the_inputs() -> Inputs:
    if not inputs:  # a rerun that skips `images` (done) still needs to know where they are
      inputs.append(Inputs(config, workdir))
    return inputs[0]

  def evaluation(hf_dir: str):
    def stage():
      if not config.eval.enabled:
        return None
      return {"model": hf_dir, **evaluate(config, hf_dir, tokenizer, prompts, mesh)}
    return stage

  def preferences():
    if not os.path.exists(prefs):
      base, data = _load(config, config.model.hf_dir, mesh)
      generate_preferences(_service(config, base, tokenizer, data, mesh),
                           the_inputs(), prompts, config.stic, prefs, image_token)
    return "done"

  def pair_quality():
    rows = pair_quality_rows(config, the_inputs(), read_jsonl(prefs))
    write_jsonl(quality, rows)
    _sync("pair_quality")
    summary = preference_quality.summarize(rows, [r["kind"] for r in rows])
    _log(f"pair quality (chosen vs rejected against the scene; {quality}):\n"
         + _quality_table(summary))
    return {"status": "done", "quality": summary}

  def oracle_filter():
    keep = {r["id"] for r in read_jsonl(quality) if r["verdict"] == "better"}
    kept = [p for p in read_jsonl(prefs) if p["id"] in keep]
    if not kept:
      raise UserError(f"stic.pair_filter='oracle': no pair of {prefs} has a truly better chosen "
                      "answer")
    write_jsonl(pairs, kept)
    _sync("oracle_filter")
    _log(f"oracle filter: {len(kept)} of {_records(prefs)} pairs kept (chosen truly better)")
    return {"status": "done", "pairs": len(kept)}

  def reference():
    if not os.path.exists(with_ref):
      base, data = _load(config, config.model.hf_dir, mesh)
      counts = write_reference_logps(
          base, pairs, with_ref, tokenizer, data, mesh,
          image_roots=(the_inputs().root,), batch_size=config.stic.generation.batch_size,
          noisy_rejected=config.dpo.noisy_rejected, log=_log)
      _log(f"reference: {counts}")
    return "done"

  def dpo_stage():
    trained = with_ref if precomputed else pairs
    steps = dpo_run.num_steps(_records(trained), config.stic.dpo_epochs,
                              config.dpo_train.batch_size)
    return dpo_run.run(
        model=config.model, tokenizer=tokenizer, preferences=trained,
        image_roots=(the_inputs().root,), pipeline=config.data.pipeline, dpo_config=config.dpo,
        optim_config=config.dpo_optim, train=dataclasses.replace(config.dpo_train, num_steps=steps),
        checkpoint_config=config.checkpoint, mesh_config=config.mesh, workdir=dpo_dir,
        stop_at=stop_at.get("dpo"))

  def describe():
    if not os.path.exists(infused):
      model, data = _load(config, dpo_export, mesh)
      infuse_sft_data(_service(config, model, tokenizer, data, mesh),
                      the_inputs(), prompts, config.stic, sft_data, image_token)
    return "done"

  def sft_stage():
    steps = dpo_run.num_steps(_records(infused), config.stic.sft_epochs,
                              config.sft_train.batch_size)
    sft_config = sft.SFTConfig(
        model=dataclasses.replace(config.model, hf_dir=dpo_export),
        data=training_sources.DataSources(shapes_tasks=(), shapes=config.data.shapes, conversations=(infused,),
                               image_roots=(the_inputs().root,), pipeline=config.data.pipeline),
        optim=config.sft_optim, train=dataclasses.replace(config.sft_train, num_steps=steps),
        checkpoint=dataclasses.replace(config.checkpoint, export_hf=True), mesh=config.mesh,
        eval=ShapesEvalConfig(yes_no=0, grounding=0, captions=0))
    return sft.train_stage(sft_config, sft_dir, tokenizer, mesh, stop_at.get("sft"),
                           summary_file="summary.json")

  stages = [Stage("images", images),
            Stage("eval_base", evaluation(config.model.hf_dir), eval_label="base",
                  model=config.model.hf_dir),
            Stage("preferences", preferences)]
  if shapes:
    stages.append(Stage("pair_quality", pair_quality))
  if oracle:
    stages.append(Stage("oracle_filter", oracle_filter))
  if precomputed:
    stages.append(Stage("reference", reference))
  stages += [Stage("dpo", dpo_stage),
             Stage("eval_dpo", evaluation(dpo_export), eval_label="dpo", model=dpo_export),
             Stage("describe", describe),
             Stage("sft", sft_stage),
             Stage("eval_sft", evaluation(sft_export), eval_label="sft", model=sft_export)]
  return Pipeline("stic", workdir, stages, config.pipeline, raw_config, config).run()
