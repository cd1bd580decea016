"""SC-Tune (Yue et al. 2024, "SC-Tune: Unleashing Self-Consistent Referential Comprehension in
Large Vision Language Models") as a pipeline of resumable stages; see METHODS.md section 1.

  eval_base    metrics of the starting model (self-consistency Acc@0.5, REC Acc@0.5, yes/no, ...)
  sctune       one training run whose phases alternate until train.num_steps:
               describer (PPO-clip, training/ppo.py): the policy samples a description of a
                 ground-truth box; the frozen snapshot grounds it greedily and the IoU with the
                 box is the reward; the self-critical baseline is the snapshot's greedy
                 description grounded by the snapshot; per-token KL to the snapshot in the reward
               locator (SFT): the snapshot describes the box greedily, and the training sequence
                 is the locator prompt with that description plus the true box text, with the
                 loss on the box tokens after <box> and the end token only
               every switch resets the optimizer with the phase's learning rate and re-syncs
               the snapshot to the policy
  eval_sctune  the same metrics of the exported model

One network plays both roles, as in the released code. Prompts are the model's own chat
template (the describer's question carries the box as BoxFormat text, the locator's is the
grounding prompt), so the method runs on LLaVA checkpoints; see configs/sctune_llava15_7b.py for
what differs from Qwen-VL. A describer step counts one rollout batch (its PPO epochs included).
Rollouts are made by every process over the whole global batch (they are the same on every
process: the records come in the same order everywhere), and each process trains on its share.
"""

import dataclasses
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_dict

from lvlm_jax.data import sources as data_sources
from lvlm_jax.data.images import load_image
from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.data.shapes import REGION_PROMPT, ShapesConfig, ShapesSource
from lvlm_jax.data.text import box_iou, tokenize_conversation
from lvlm_jax.data.tokenizer import load_tokenizer
from lvlm_jax.data import training_sources
from lvlm_jax.dataclass_config import help_field, method_defaults, method_help, parse_method
from lvlm_jax.errors import UserError
from lvlm_jax.eval.shapes import ShapesEvalConfig
from lvlm_jax.methods import sft, training_run
from lvlm_jax.methods.pipeline import Pipeline, PipelineConfig, Stage
from lvlm_jax.models import building, hf
from lvlm_jax.sampling.decode import SamplingConfig
from lvlm_jax.sampling.service import GenerationService, Prompt, pad_id
from lvlm_jax.sharding import MeshConfig, mesh_from_config
from lvlm_jax.training import checkpoint, loop, optim, ppo, state as train_state, steps
from lvlm_jax.training.sctune_masks import eos_inclusive_mask, locator_loss_mask

_PAD_TO = 16


@dataclasses.dataclass(frozen=True)
class SCTuneData:
  """The ground-truth boxes SC-Tune trains on (it needs no captions)."""
  source: str = help_field("shapes", "'shapes': boxes of the shapes world; 'files': the "
                           "grounding JSONL files in `grounding` (Objects365/RefCOCO style).")
  shapes: ShapesConfig = help_field(ShapesConfig(), "The shapes world (training boxes and the "
                                    "held-out evaluation draw disjoint scenes).")
  num_boxes: int = help_field(4000, "source='shapes': boxes to draw the batches from.")
  grounding: tuple[str, ...] = help_field((), "source='files': grounding JSONL files ('image' or "
                                          "'image_id', 'box' or 'bbox' normalised to [0, 1]).")
  image_roots: tuple[str, ...] = help_field((), "Folders searched for relative image paths.")
  pipeline: DataConfig = help_field(DataConfig(), "Template, system prompt, box format, "
                                    "grounding prompt and length buckets.")

  def __post_init__(self):
    if self.source not in ("shapes", "files"):
      raise UserError(f"data.source={self.source!r} is not 'shapes' or 'files'")
    if self.source == "files" and not self.grounding:
      raise UserError("data.source='files' needs data.grounding files")


@dataclasses.dataclass(frozen=True)
class SCTuneSettings:
  """The describer/locator cycle (METHODS.md 1.3; defaults are the released code's)."""
  describer_prompt: str = help_field(REGION_PROMPT, "Describer question; {box} becomes the box "
                                     "text (SC-Tune: '<ref>This</ref><box>...</box> is').")
  describer_answer_start: str = help_field("the", "Text descriptions begin with (the shapes "
                                           "world's do); '' for a plain generation prompt.")
  describer_steps: int = help_field(200, "Describer (PPO) rollout batches per cycle (SC-Tune: 200).")
  locator_steps: int = help_field(100, "Locator (SFT) steps per cycle (SC-Tune: 100).")
  describer_lr: float = help_field(5e-7, "Constant learning rate of the describer phase "
                                   "(SC-Tune: 5e-7).")
  locator_lr: float = help_field(1e-6, "Constant learning rate of the locator phase (SC-Tune: 1e-6).")
  top_k: int = help_field(100, "Describer sampling top-k (SC-Tune: 100).")
  top_p: float = help_field(0.3, "Describer sampling top-p (SC-Tune: 0.3).")
  temperature: float = help_field(1.0, "Describer sampling temperature (SC-Tune: 1.0).")
  min_description_tokens: int = help_field(3, "Fewest new tokens of a description (SC-Tune: 3).")
  max_description_tokens: int = help_field(30, "Most new tokens of a description (SC-Tune: 30).")
  max_box_tokens: int = help_field(20, "Most new tokens of the locator's greedy box (SC-Tune: 20).")
  seed: int = help_field(0, "Seed of the box order and the describer's sampling.")

  def __post_init__(self):
    if "{box}" not in self.describer_prompt:
      raise UserError("sctune.describer_prompt needs a {box} field for the box text")
    if self.describer_steps < 1 or self.locator_steps < 0:
      raise UserError("sctune.describer_steps must be >= 1 and sctune.locator_steps >= 0")


@dataclasses.dataclass(frozen=True)
class SCTuneConfig:
  model: building.ModelConfig
  data: SCTuneData
  sctune: SCTuneSettings
  ppo: ppo.PPOConfig
  optim: optim.OptimConfig
  train: loop.TrainConfig
  checkpoint: checkpoint.CheckpointConfig
  mesh: MeshConfig
  eval: ShapesEvalConfig
  pipeline: PipelineConfig = PipelineConfig()


SECTIONS = {"model": building.ModelConfig, "data": SCTuneData, "sctune": SCTuneSettings,
            "ppo": ppo.PPOConfig, "optim": optim.OptimConfig, "train": loop.TrainConfig,
            "checkpoint": checkpoint.CheckpointConfig, "mesh": MeshConfig,
            "eval": ShapesEvalConfig, "pipeline": PipelineConfig}
# The phases set the learning rate and its (constant) schedule.
EXCLUDED = {"data": training_sources.DERIVED_PIPELINE_FIELDS,
            "optim": ("lr", "lr_groups", "schedule", "warmup_ratio", "final_lr_ratio")}


def default_config() -> config_dict.ConfigDict:
  """Every SC-Tune setting at its default; config files start from this."""
  return method_defaults("sctune", SECTIONS, EXCLUDED)


def config_help() -> list[str]:
  return method_help("sctune", SECTIONS, EXCLUDED)


def parse(config: config_dict.ConfigDict | dict) -> SCTuneConfig:
  """The typed config; a UserError names any unknown key or bad value."""
  parsed = parse_method(SCTuneConfig, config)
  if not parsed.model.hf_dir:
    raise UserError("SC-Tune improves a trained model: set model.hf_dir (e.g. the quickstart "
                    "export, workdir/quickstart/export/hf)")
  return parsed


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[sctune] {message}", flush=True)


class Boxes:
  """The ground-truth boxes: records with one image (uint8 [H, W, 3] or a path) and a box."""

  def __init__(self, config: SCTuneData):
    if config.source == "shapes":
      world = dataclasses.replace(config.shapes, seed=config.shapes.seed + 3)
      self.source = ShapesSource(world, "grounding", config.num_boxes)
    else:
      roots = config.image_roots or None
      parts = [data_sources.GroundingSource(path, roots) for path in config.grounding]
      self.source = parts[0] if len(parts) == 1 else data_sources.Mixture(parts)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    record = self.source[index]
    image = record["images"][0]
    return {"image": load_image(image) if isinstance(image, str) else image,
            "box": np.asarray(record["box"], np.float64)}

  def batches(self, batch_size: int, seed: int):
    """A resumable (checkpointed) iterator of index batches [batch_size], reshuffled per epoch."""
    dataset = grain.MapDataset.range(len(self)).seed(seed).shuffle().repeat().batch(batch_size)
    return iter(dataset)


@dataclasses.dataclass
class Roles:
  """The policy and the frozen snapshot as generation services of one rollout."""
  policy: GenerationService
  snapshot: GenerationService


class Rollouts:
  """Makes the batches of both phases from the current train state."""

  def __init__(self, config: SCTuneConfig, built: training_run.Built, tokenizer,
               data: DataConfig, boxes: Boxes):
    self.config, self.built, self.tokenizer, self.data, self.boxes = (config, built, tokenizer,
                                                                      data, boxes)
    settings = config.sctune
    eos = tokenizer.eos_token_id
    stops = (eos,) if eos is not None else ()
    self.pad_id = pad_id(tokenizer)
    self.sample = SamplingConfig(
        max_new_tokens=settings.max_description_tokens,
        min_new_tokens=settings.min_description_tokens, do_sample=True,
        temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
        eos_token_ids=stops, pad_token_id=self.pad_id)
    self.describe = dataclasses.replace(self.sample, do_sample=False, min_new_tokens=0)
    self.locate = SamplingConfig(max_new_tokens=settings.max_box_tokens, eos_token_ids=stops,
                                 pad_token_id=self.pad_id)
    # None: a box format without an opening token (Qwen2.5-VL's JSON), whose locator loss is
    # then the whole answer.
    self.box_open_id = (tokenizer.convert_tokens_to_ids(data.box_format.open)
                        if data.box_format.open else None)

  def _roles(self, state) -> Roles:
    graphdef, size = self.built.graphdef, self.config.train.batch_size
    mesh = self.built.mesh
    policy = nnx.merge(graphdef, state["params"], state["frozen"])
    snapshot = nnx.merge(graphdef, state["snapshot"], state["frozen"])
    return Roles(GenerationService(policy, self.tokenizer, self.data, mesh, size),
                 GenerationService(snapshot, self.tokenizer, self.data, mesh, size))

  def _records(self, batches) -> list[dict]:
    return [self.boxes[int(i)] for i in next(batches)]

  def describer_prompts(self, records) -> list[Prompt]:
    settings = self.config.sctune
    return [Prompt.question(settings.describer_prompt.format(
        box=self.data.box_text(r["box"], r["image"])), (r["image"],),
        settings.describer_answer_start) for r in records]

  def ious(self, service: GenerationService, records, descriptions: list[str]) -> np.ndarray:
    """IoU [B] of the greedy box `service` gives each description with the true box (an answer
    that does not parse is box [0, 0, 0, 0], IoU 0, as SC-Tune's parser)."""
    prompts = [Prompt.question(self.data.grounding_prompt.format(expression=d), (r["image"],),
                               self.data.box_format.open) for d, r in zip(descriptions, records)]
    answers = service.texts(prompts, self.locate, desc="locate")
    boxes = [self.data.parse_box(a, r["image"]) for a, r in zip(answers, records)]
    return np.asarray([0.0 if b is None else float(box_iou(b, r["box"]))
                       for b, r in zip(boxes, records)], np.float32)

  def _share(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows of a global batch."""
    rows = batch["input_ids"].shape[0] // jax.process_count()
    start = jax.process_index() * rows
    return {k: v[start:start + rows] for k, v in batch.items()}

  def _sequences(self, prompts_ids, answers_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, answer start) of prompt + answer rows, right-padded."""
    rows = [np.concatenate([p, a]).astype(np.int32) for p, a in zip(prompts_ids, answers_ids)]
    length = -(-max(len(r) for r in rows) // _PAD_TO) * _PAD_TO
    ids = np.full((len(rows), length), self.pad_id, np.int32)
    attention = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
      ids[i, :len(row)], attention[i, :len(row)] = row, 1
    return ids, attention, np.asarray([len(p) for p in prompts_ids])

  def _images(self, records) -> dict[str, np.ndarray]:
    """The records' images as a batch holds them (`DataConfig.image_arrays`)."""
    return self.data.image_arrays([[r["image"]] for r in records])

  def describer_batch(self, state, batches) -> dict[str, np.ndarray]:
    """A PPO batch: the policy's sampled descriptions of the boxes, rewarded by the snapshot."""
    records = self._records(batches)
    roles = self._roles(state)
    prompts = self.describer_prompts(records)
    rng = jax.random.fold_in(jax.random.key(self.config.sctune.seed), int(state["step"]))
    sampled = roles.policy.generate(prompts, self.sample, rng, desc="describe")
    greedy = roles.snapshot.texts(prompts, self.describe, desc="baseline")
    reward = self.ious(roles.snapshot, records, [c.text for c in sampled])
    baseline = self.ious(roles.snapshot, records, greedy)
    prompt_ids = [roles.policy.prompt_ids(p) for p in prompts]
    ids, attention, start = self._sequences(prompt_ids, [c.token_ids for c in sampled])
    # The sampled tokens up to and including the end token (the generation's stop token is the
    # EOS; rows cut at max_new_tokens end where the attention does).
    ends = attention.sum(1) - 1
    mask = eos_inclusive_mask(ids, start, self.tokenizer.eos_token_id)
    mask *= np.arange(ids.shape[1])[None] <= ends[:, None]
    batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": mask,
             **self._images(records)}
    graphdef = self.built.graphdef
    with jax.set_mesh(self.built.mesh):
      placed = jax.tree.map(jnp.asarray, batch)
      batch["rollout_logps"] = np.asarray(ppo.token_logps(graphdef, state["params"],
                                                          state["frozen"], placed))
      batch["snapshot_logps"] = np.asarray(ppo.token_logps(graphdef, state["snapshot"],
                                                           state["frozen"], placed))
    batch.update(reward=reward, baseline=baseline)
    return self._share(batch)

  def locator_batch(self, state, batches) -> dict[str, np.ndarray]:
    """An SFT batch: the snapshot's greedy description as the expression, the true box as the
    answer, the loss on the box tokens after <box> and the end token (a box format without an
    opening token, Qwen2.5-VL's JSON: on the whole answer)."""
    records = self._records(batches)
    roles = self._roles(state)
    descriptions = roles.snapshot.texts(self.describer_prompts(records), self.describe,
                                        desc="describe")
    rows, answers = [], []
    for description, record in zip(descriptions, records):
      turns = self.data.place_images(
          [{"from": "human", "value": self.data.grounding_prompt.format(expression=description)},
           {"from": "gpt", "value": self.data.box_text(record["box"], record["image"])}], 1)
      ids, answer = tokenize_conversation(turns, self.tokenizer, self.data.template,
                                          system=self.data.system_prompt,
                                          image_token=self.data.image_token,
                                          tokens_per_image=self.data.image_tokens([record["image"]]))
      rows.append(ids)
      answers.append(answer)
    ids, attention, _ = self._sequences(rows, [np.zeros(0, np.int32)] * len(rows))
    if self.box_open_id is None:
      mask = np.zeros(ids.shape, np.float32)
      for i, answer in enumerate(answers):
        mask[i, :len(answer)] = answer
    else:
      mask = locator_loss_mask(ids, self.box_open_id, self.tokenizer.eos_token_id) * attention
    return self._share({"input_ids": ids, "attention_mask": attention,
                        "loss_mask": mask.astype(np.float32),
                        **self._images(records)})


def _phases(config: SCTuneConfig, built: training_run.Built, rollouts: Rollouts):
  """(describer, locator): each phase's step with its own constant-lr optimizer, entered with a
  fresh optimizer state and the snapshot re-synced."""
  settings = config.sctune
  _, abstract_params, _ = nnx.split(built.abstract_model, built.trainable, ...)

  def tx_at(lr):
    constant = dataclasses.replace(config.optim, lr=lr, schedule="constant", warmup_ratio=0.0)
    return optim.make_optimizer(constant, config.train.num_steps, abstract_params)

  def enter(tx):
    def switch(state):
      state = train_state.reset_optimizer(state, tx, built.shardings)
      return {**state, "snapshot": jax.tree.map(jnp.copy, state["params"])}
    return switch

  static = dict(graphdef=built.graphdef, accum_steps=config.train.grad_accum_steps,
                logits_chunk=config.train.logits_chunk)
  describer_tx, locator_tx = tx_at(settings.describer_lr), tx_at(settings.locator_lr)
  describer = steps.jit_train_step(ppo.ppo_update, built.shardings, built.mesh, tx=describer_tx,
                                   config=config.ppo, **static)
  locator = steps.jit_train_step(steps.sft_step, built.shardings, built.mesh, tx=locator_tx,
                                 **static)
  phases = (loop.Phase("describer", settings.describer_steps, describer,
                       rollouts.describer_batch, enter(describer_tx)),)
  if settings.locator_steps:
    phases += (loop.Phase("locator", settings.locator_steps, locator, rollouts.locator_batch,
                          enter(locator_tx)),)
  return phases


def train_stage(config: SCTuneConfig, workdir: str, tokenizer, mesh,
                stop_at: int | None = None) -> dict:
  boxes = Boxes(config.data)
  snapshot = training_run.StateExtra("snapshot", lambda params: params,
                                     lambda state: jax.tree.map(jnp.copy, state["params"]))
  made = {}

  def batches(built):
    made["data"] = training_sources.pipeline_config(config.data, built.abstract_model,
                                                    config.model.hf_dir, config.train.batch_size)
    return boxes.batches(config.train.batch_size, config.sctune.seed), made["data"]

  def phases(built):
    return _phases(config, built, Rollouts(config, built, tokenizer, made["data"], boxes))

  return training_run.run(
      workdir=workdir, model=config.model, tokenizer=tokenizer, optim_config=config.optim,
      train=config.train, checkpoint_config=config.checkpoint, mesh=mesh, batches=batches,
      steps=phases, extras=(snapshot,), name="sctune", stop_at=stop_at)


def run(config: SCTuneConfig, workdir: str, *, raw_config: config_dict.ConfigDict | None = None,
        stop_at: int | None = None) -> dict:
  """Runs (or resumes) every stage in `workdir`; returns the summary (also summary.json).
  stop_at: stop training after this step as a preemption would (tests)."""
  mesh = mesh_from_config(config.mesh)
  tokenizer = load_tokenizer(config.model, (config.data.pipeline.grounding_prompt,
                                            config.sctune.describer_prompt))
  run_dir = os.path.join(workdir, "sctune")

  def evaluate(hf_dir):
    def stage():
      if not config.eval.enabled:
        return None
      model = hf.load_model(hf_dir, mesh=mesh, dtype=config.model.dtype,
                            param_dtype=config.model.param_dtype)
      return {"model": hf_dir, **sft.evaluate_model(model, tokenizer, mesh, config.data, hf_dir,
                                                    config.eval)}
    return stage

  export = os.path.join(run_dir, "export", "hf")
  stages = [Stage("eval_base", evaluate(config.model.hf_dir), eval_label="base",
                  model=config.model.hf_dir),
            Stage("sctune", lambda: train_stage(config, run_dir, tokenizer, mesh, stop_at)),
            Stage("eval_sctune", evaluate(export), eval_label="sctune", model=export)]
  return Pipeline("sctune", workdir, stages, config.pipeline, raw_config, config).run()
