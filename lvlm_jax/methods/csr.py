"""CSR (Zhou et al. 2024, "Calibrated Self-Rewarding Vision Language Models") as a pipeline of
resumable stages; see METHODS.md section 3.

  images          shapes world only: the prompt images as PNG files and prompts.json
                  ({id, image, input}, CSR-Prompt-Dataset's layout)
  eval_base       metrics of the starting model
  round_<k>/search  the policy's sentence-level search tree of every prompt (methods/csr_tree.py),
                  each sentence scored by the CLIP scorer; trees.jsonl, resumable by batch
  round_<k>/pairs   chosen = the best final path, rejected = the worst (one pair per prompt), in
                  the LLaVA conversations / rejected_conversations layout (pairs.jsonl); on the
                  shapes world each pair is also judged against its scene (quality.jsonl)
  round_<k>/dpo     sigmoid DPO (no NLL term) with LoRA, the reference the adapter-disabled
                  policy; its export merges the adapters and is the next round's policy
  eval_round_<k>
Each evaluation: the shapes-world metrics `python -m lvlm_jax.evaluate` computes (yes/no accuracy,
caption chair_i / chair_s / recall), one row per round in summary.json.
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
from lvlm_jax.data.images import load_image, resolve_image_path
from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.data.shapes import ShapesConfig, held_out_world, make_scene, render
from lvlm_jax.data.tokenizer import load_tokenizer
from lvlm_jax.dataclass_config import help_field, method_defaults, method_help, parse_method
from lvlm_jax.errors import UserError
from lvlm_jax.eval import preference_quality
from lvlm_jax.eval.clip_score import CLIPScorer
from lvlm_jax.eval.shapes import ShapesEvalConfig, ShapesEvaluator
from lvlm_jax.methods import csr_tree
from lvlm_jax.methods import dpo as dpo_run
from lvlm_jax.methods.pipeline import Pipeline, PipelineConfig, Stage
from lvlm_jax.models import building, hf
from lvlm_jax.sampling.service import GenerationService, Prompt
from lvlm_jax.sharding import MeshConfig, mesh_from_config
from lvlm_jax.training import checkpoint, loop, optim
from lvlm_jax.training.dpo import DPOConfig

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
# The shapes scenes CSR describes: neither the starting model's (world seed), STIC's (1, 2), the
# shapes CLIP's (3) nor the evaluation's (held_out_world).
_PROMPT_WORLD = 4


@dataclasses.dataclass(frozen=True)
class CSRData:
  """The images and prompts CSR searches on; the shapes world or files."""
  source: str = help_field("shapes", "'shapes': images from the shapes world, prompts from "
                           "csr.prompts; 'files': prompt_file and image_root.")
  shapes: ShapesConfig = help_field(ShapesConfig(), "The shapes world.")
  num_prompts: int = help_field(12856, "Prompts searched per round (CSR: the 12,856 of "
                                "CSR-Prompt-Dataset-12k); with source='files', the first this "
                                "many (0: all).")
  prompt_file: str = help_field("", "source='files': JSON list of {id, image, input} "
                                "(CSR-Prompt-Dataset-12k.json), image paths relative to "
                                "image_root, each input with its <image>.")
  image_root: str = help_field("", "source='files': the folder the image paths are relative to.")
  pipeline: DataConfig = help_field(DataConfig(), "Batching of DPO: template, lengths, workers.")

  def __post_init__(self):
    if self.source not in ("shapes", "files"):
      raise UserError(f"data.source={self.source!r} is not 'shapes' or 'files'")
    if self.source == "files":
      for key in ("prompt_file", "image_root"):
        if not getattr(self, key) or not os.path.exists(getattr(self, key)):
          raise UserError(f"data.source='files' needs data.{key}: {getattr(self, key)!r} does "
                          "not exist")


@dataclasses.dataclass(frozen=True)
class CSRSettings:
  """The rounds, the search and the scorer."""
  rounds: int = help_field(3, "Search -> pairs -> DPO iterations (CSR: 3).")
  prompts: str = help_field("shapes", "source='shapes': the description prompts, 'shapes' or "
                            "'paper' (CSR's 11) or a file with one prompt per line.")
  image_after_prob: float = help_field(0.5, "source='shapes': share of prompts with <image> "
                                       "after the question (CSR: half of its 22 inputs).")
  tree: csr_tree.TreeConfig = help_field(csr_tree.TreeConfig(), "The sentence-level search and "
                                         "its rewards.")
  search_batch_size: int = help_field(8, "Prompts searched together (the beam search runs "
                                      "search_batch_size * (keep_top + keep_bottom) nodes, "
                                      "each with num_beams beams).")
  clip_dir: str = help_field("", "HF CLIPModel folder of the scorer (CSR: "
                             "openai/clip-vit-large-patch14-336; shapes: the export of "
                             "configs/clip_shapes.py).")
  clip_batch_size: int = help_field(64, "Texts scored together.")
  dpo_epochs: float = help_field(1.0, "Passes over a round's pairs (CSR: 1).")
  seed: int = help_field(42, "Seed of the prompt draws.")


@dataclasses.dataclass(frozen=True)
class CSRConfig:
  model: building.ModelConfig
  data: CSRData
  csr: CSRSettings
  dpo: DPOConfig
  dpo_optim: optim.OptimConfig
  dpo_train: loop.TrainConfig
  checkpoint: checkpoint.CheckpointConfig
  mesh: MeshConfig
  eval: ShapesEvalConfig
  pipeline: PipelineConfig = PipelineConfig()


SECTIONS = {"model": building.ModelConfig, "data": CSRData, "csr": CSRSettings, "dpo": DPOConfig,
            "dpo_optim": optim.OptimConfig, "dpo_train": loop.TrainConfig,
            "checkpoint": checkpoint.CheckpointConfig, "mesh": MeshConfig,
            "eval": ShapesEvalConfig, "pipeline": PipelineConfig}
EXCLUDED = {"data": training_sources.DERIVED_PIPELINE_FIELDS + ("pipeline.with_ref_logps",),
            "dpo_train": ("num_steps",)}


def default_config() -> config_dict.ConfigDict:
  """Every CSR setting at its default; config files start from this."""
  return method_defaults("csr", SECTIONS, EXCLUDED)


def config_help() -> list[str]:
  return method_help("csr", SECTIONS, EXCLUDED)


def parse(config: config_dict.ConfigDict | dict) -> CSRConfig:
  """The typed config; a UserError names any unknown key or bad value."""
  parsed = parse_method(CSRConfig, config)
  if not parsed.model.hf_dir:
    raise UserError("CSR improves a trained model: set model.hf_dir (e.g. the quickstart "
                    "export, workdir/quickstart/export/hf)")
  if not parsed.csr.clip_dir:
    raise UserError("csr.clip_dir: set the CLIP scorer's HF folder (shapes world: "
                    "workdir/clip_shapes/export/hf from configs/clip_shapes.py)")
  if parsed.csr.rounds < 1:
    raise UserError(f"csr.rounds={parsed.csr.rounds} must be at least 1")
  if parsed.dpo.nll_coef:
    raise UserError("dpo.nll_coef: CSR's DPO has no NLL term; set it to 0")
  if parsed.data.source == "shapes":
    load_prompts(parsed.csr.prompts)
  return parsed


def load_prompts(prompts: str) -> list[str]:
  path = (os.path.join(PROMPTS_DIR, f"csr_{prompts}", "prompts.txt")
          if prompts in ("shapes", "paper") else prompts)
  try:
    with open(path) as f:
      out = [line.strip() for line in f if line.strip()]
  except OSError as e:
    raise UserError(f"csr.prompts: cannot read {path}: {e.strerror}") from None
  if not out:
    raise UserError(f"{path}: no prompts (one per line)")
  return out


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[csr] {message}", flush=True)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"csr_{name}")


def _world(config: CSRConfig) -> ShapesConfig:
  return dataclasses.replace(config.data.shapes, seed=config.data.shapes.seed + _PROMPT_WORLD)


def write_shapes_prompts(config: CSRConfig, directory: str, image_token: str) -> None:
  """directory/prompts.json ({id, image, input}) and the PNGs, like CSR's prompt dataset."""
  tmp = directory + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  world, prompts = _world(config), load_prompts(config.csr.prompts)
  records = []
  for i in range(config.data.num_prompts):
    name = f"{i:06d}.png"
    Image.fromarray(render(make_scene(world, i), world.image_size)).save(os.path.join(tmp, name))
    rng = np.random.default_rng([config.csr.seed, i])
    question = prompts[rng.integers(len(prompts))]
    text = (f"{question}\n{image_token}" if rng.random() < config.csr.image_after_prob
            else f"{image_token}\n{question}")
    records.append({"id": f"shapes_{i:06d}", "image": name, "input": text, "scene": i})
  write_json(os.path.join(tmp, "prompts.json"), records)
  os.replace(tmp, directory)


class Inputs:
  """The prompt records and where their images are."""

  def __init__(self, config: CSRConfig, workdir: str, image_token: str):
    if config.data.source == "files":
      self.root = config.data.image_root
      try:
        records = read_json(config.data.prompt_file)
      except ValueError as e:
        raise UserError(f"{config.data.prompt_file}: not valid JSON ({e})") from None
      if not isinstance(records, list) or not all(
          isinstance(r, dict) and {"id", "image", "input"} <= set(r) for r in records):
        raise UserError(f"{config.data.prompt_file}: expected a JSON list of "
                        "{id, image, input} records")
      self.records = records[:config.data.num_prompts or None]
    else:
      self.root = os.path.join(workdir, "images")
      if not os.path.isdir(self.root):
        _log("images: writing the shapes-world prompt images")
        if jax.process_index() == 0:
          write_shapes_prompts(config, self.root, image_token)
        _sync("images")
      self.records = read_json(os.path.join(self.root, "prompts.json"))

  def image(self, record: dict) -> np.ndarray:
    return load_image(resolve_image_path(record["image"], (self.root,)))


def sentence_config(tree: csr_tree.TreeConfig, tokenizer) -> csr_tree.SentenceConfig:
  """The tree's sentence search with the tokenizer's '.', end and pad ids where unset."""
  s = tree.sentences
  ends = s.sentence_end_ids
  if not ends:
    dot = tokenizer.convert_tokens_to_ids(".")
    if dot is None or dot == tokenizer.unk_token_id:
      raise UserError("csr.tree.sentences.sentence_end_ids: the tokenizer has no '.' token; "
                      "give the id(s) that end a sentence")
    ends = (dot,)
  return dataclasses.replace(
      s, sentence_end_ids=tuple(ends),
      response_end_ids=tuple(s.response_end_ids) or (tokenizer.eos_token_id,),
      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def search_trees(service: GenerationService, scorer: CLIPScorer, inputs: Inputs,
                 tree: csr_tree.TreeConfig, path: str) -> None:
  """Every prompt's tree to `path` ({id, image, prompt, nodes} per line), resumable by batch."""
  size = service.batch_size
  sentences = sentence_config(tree, service.tokenizer)
  tree = dataclasses.replace(tree, sentences=sentences)
  decode = lambda ids: service.tokenizer.decode(ids, skip_special_tokens=True).strip()
  writer = JsonlWriter(path, size)
  start = writer.resume()
  total = len(inputs.records)
  if start:
    _log(f"search: resuming after {start} of {total} prompts")
  for first in range(start, total, size):
    preemption.check()
    records = inputs.records[first:first + size]
    images = [inputs.image(r) for r in records]
    prompts = [Prompt.question(r["input"], (image,)) for r, image in zip(records, images)]
    embeds = scorer.embed_images(images)
    clip = lambda rows, texts: scorer.scores_of_embedded(embeds, rows, texts)
    trees = csr_tree.search(len(prompts), csr_tree.batched_expand(service, prompts, sentences,
                                                                  tree), clip, decode, tree)
    writer.append([{"id": r["id"], "image": r["image"], "prompt": r["input"], "nodes": nodes,
                    **({"scene": r["scene"]} if "scene" in r else {})}
                   for r, nodes in zip(records, trees)])
    _log(f"search: {min(first + size, total)}/{total}")
  writer.close()


def build_pairs(trees: list[dict], tree: csr_tree.TreeConfig) -> list[dict]:
  """One pair per tree with two different final responses (LLaVA layout)."""
  pairs = []
  for record in trees:
    nodes = record["nodes"]
    picked = csr_tree.choose(nodes, tree)
    if picked is None:
      continue
    scores = csr_tree.path_scores(nodes, tree)
    (chosen, rejected) = (nodes[i] for i in picked)
    human = {"from": "human", "value": record["prompt"]}
    pairs.append({"id": record["id"], "image": record["image"],
                  "conversations": [human, {"from": "gpt", "value": chosen["text"]}],
                  "rejected_conversations": [human, {"from": "gpt", "value": rejected["text"]}],
                  "chosen_score": scores[picked[0]], "rejected_score": scores[picked[1]],
                  **({"scene": record["scene"]} if "scene" in record else {})})
  return pairs


def _quality(config: CSRConfig, pairs: list[dict]) -> tuple[list[dict], dict]:
  """Each shapes pair judged against its scene (`eval/preference_quality.py`)."""
  world = _world(config)
  rows = [{"id": p["id"], **preference_quality.pair_quality(
      p["conversations"][-1]["value"], p["rejected_conversations"][-1]["value"],
      make_scene(world, p["scene"]))} for p in pairs]
  return rows, preference_quality.summarize(rows, ["pairs"] * len(rows))["all"]


def _load(config: CSRConfig, hf_dir: str, mesh):
  model = hf.load_model(hf_dir, mesh=mesh, allow_pickle=config.model.allow_pickle,
                        dtype=config.model.dtype, param_dtype=config.model.param_dtype)
  data = training_sources.pipeline_config(config.data, model, hf_dir,
                                          config.csr.search_batch_size)
  return model, data


def evaluate(config: CSRConfig, hf_dir: str, tokenizer, mesh) -> dict[str, float]:
  """The metrics of `python -m lvlm_jax.evaluate --model hf_dir` on the held-out shapes world."""
  model, data = _load(config, hf_dir, mesh)
  evaluator = ShapesEvaluator(tokenizer, data, held_out_world(config.data.shapes), config.eval,
                              mesh)
  with jax.set_mesh(mesh):
    return evaluator(model)


def _records(path: str) -> int:
  with open(path) as f:
    return sum(1 for line in f if line.strip())


def run(config: CSRConfig, workdir: str, *, raw_config: config_dict.ConfigDict | None = None,
        stop_at: dict[str, int] | None = None) -> dict:
  """Runs (or resumes) every stage in `workdir` (methods/pipeline.py); returns the summary.

  stop_at: {"round_<k>/dpo": step} stops that training there as a preemption would (tests).
  """
  stop_at = stop_at or {}
  mesh = mesh_from_config(config.mesh)
  tokenizer = load_tokenizer(config.model, (config.data.pipeline.grounding_prompt,))
  image_token = config.data.pipeline.image_token
  shapes = config.data.source == "shapes"
  inputs = []

  def the_inputs() -> Inputs:
    if not inputs:
      inputs.append(Inputs(config, workdir, image_token))
    return inputs[0]

  def images():
    the_inputs()
    return "done"

  def evaluation(hf_dir: str):
    def stage():
      if not config.eval.enabled or not shapes:
        return None
      return {"model": hf_dir, **evaluate(config, hf_dir, tokenizer, mesh)}
    return stage

  def search(policy: str, round_dir: str):
    def stage():
      trees = os.path.join(round_dir, "search", "trees.jsonl")
      if not os.path.exists(trees):
        model, data = _load(config, policy, mesh)
        service = GenerationService(model, tokenizer, data, mesh, config.csr.search_batch_size)
        scorer = CLIPScorer.load(config.csr.clip_dir, clamp=config.csr.tree.clamp,
                                 batch_size=config.csr.clip_batch_size)
        if jax.process_index() == 0:
          os.makedirs(os.path.dirname(trees), exist_ok=True)
        search_trees(service, scorer, the_inputs(), config.csr.tree, trees)
      return "done"
    return stage

  def pairs(round_dir: str):
    def stage():
      path = os.path.join(round_dir, "pairs", "pairs.jsonl")
      built = build_pairs(read_jsonl(os.path.join(round_dir, "search", "trees.jsonl")),
                          config.csr.tree)
      if not built:
        raise UserError(f"{round_dir}: no prompt's tree has two different final responses; "
                        "allow longer responses (csr.tree.max_response_tokens, max_chars)")
      info = {"status": "done", "pairs": len(built)}
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if shapes:
          rows, info["quality"] = _quality(config, built)
          write_jsonl(os.path.join(round_dir, "pairs", "quality.jsonl"), rows)
        write_jsonl(path, built)
      _sync("pairs")
      _log(f"pairs: {len(built)} of {len(the_inputs().records)} prompts"
           + (f"; chosen truly better {info['quality']['chosen_better']:.2f}, worse "
              f"{info['quality']['chosen_worse']:.2f}, chair_i chosen "
              f"{info['quality']['chosen_chair_i']:.3f} vs rejected "
              f"{info['quality']['rejected_chair_i']:.3f}" if shapes else ""))
      return info
    return stage

  def dpo(policy: str, round_dir: str, name: str):
    def stage():
      path = os.path.join(round_dir, "pairs", "pairs.jsonl")
      steps = dpo_run.num_steps(_records(path), config.csr.dpo_epochs,
                                config.dpo_train.batch_size)
      return dpo_run.run(
          model=dataclasses.replace(config.model, hf_dir=policy), tokenizer=tokenizer,
          preferences=path, image_roots=(the_inputs().root,), pipeline=config.data.pipeline,
          dpo_config=config.dpo, optim_config=config.dpo_optim,
          train=dataclasses.replace(config.dpo_train, num_steps=steps),
          checkpoint_config=dataclasses.replace(config.checkpoint, export_hf=True),
          mesh_config=config.mesh, workdir=os.path.join(round_dir, "dpo"),
          stop_at=stop_at.get(name))
    return stage

  stages = [Stage("images", images),
            Stage("eval_base", evaluation(config.model.hf_dir), eval_label="base",
                  model=config.model.hf_dir)]
  policy = config.model.hf_dir
  for k in range(1, config.csr.rounds + 1):
    name = f"round_{k}"
    round_dir = os.path.join(workdir, name)
    stages += [Stage(f"{name}/search", search(policy, round_dir)),
               Stage(f"{name}/pairs", pairs(round_dir)),
               Stage(f"{name}/dpo", dpo(policy, round_dir, f"{name}/dpo"))]
    policy = os.path.join(round_dir, "dpo", "export", "hf")
    stages.append(Stage(f"eval_{name}", evaluation(policy), eval_label=name, model=policy))
  return Pipeline("csr", workdir, stages, config.pipeline, raw_config, config).run()
