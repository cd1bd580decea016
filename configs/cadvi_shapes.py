"""CaD-VI on the shapes world, from the quickstart model, on a CPU.

    python -m lvlm_jax.train --config configs/quickstart.py     # the starting model, first
    python -m lvlm_jax.train --config configs/cadvi_shapes.py

Every stage of the paper's recipe (configs/cadvi_llava15_7b.py) at toy scale. Phase 1: image
pairs of the shapes world with controlled differences; from their two captions alone a CaD
summary (the caption-only writer of lvlm_jax/data/caption_pairs.py stands in for Mixtral) and a
binary image-selection instruction; the phase-1 model trains on them beside shapes tasks that
stand in for LLaVA-665K. Phase 2: that model re-annotates other pairs given both images and
only their difference annotation as context; the final model trains from the base on base data
+ phase-1 data twice + phase-2 data. Held-out pairs measure two-image selection
(pair_selection_accuracy) and the commonalities/differences a summary gets right
(cad_summary_precision/recall/f1), with yes/no accuracy, before and after each phase
(workdir/cadvi_shapes/summary.json). The prompts are shapes-vocabulary forms of the paper's: the
quickstart tokenizer has no words for them, and its answers are 1 and 2 rather than letters.
"""

from lvlm_jax.dataclass_config import sibling_config
from lvlm_jax.methods import cadvi


def get_config():
  config = cadvi.default_config()

  # The quickstart export (its tokenizer is read from the same folder).
  config.model.hf_dir = "workdir/quickstart/export/hf"
  config.model.tokenizer = ""
  # LoRA on every LLM linear, the projector trained at its own rate, the vision tower frozen
  # (CaD-VI: r 128 / alpha 256 on a 4096-wide LLM; r 16 / alpha 32 on this 64-wide one).
  config.model.use_lora = True
  config.model.lora.rank = 16
  config.model.lora.alpha = 32.0
  config.model.lora.target = r"llm\.layers\.\d+\..*_proj"

  # The starting model's own world, read from its config so that the two never diverge; the
  # pairs come from scenes of it that no stage trained on.
  config.data.shapes = sibling_config(__file__, "quickstart.py").data.shapes
  config.data.phase1_pairs = 1000
  config.data.phase2_pairs = 500
  config.data.base_tasks = (("caption", 250), ("yes_no", 250))
  config.data.pipeline.system_prompt = ""  # as quickstart trained
  config.data.pipeline.max_images = 2
  config.data.pipeline.length_buckets = (96, 192)
  config.data.pipeline.read_threads = 2

  config.cad.summary_prompt = "Summarize the commonalities and differences of the two images."
  config.cad.context_prompt = ("{context}\nSummarize the commonalities and differences of the two "
                               "images.")
  config.cad.selection_prompt = "{statement} Is it image 1 or image 2? Answer with 1 or 2."
  config.cad.selection_answers = ("1", "2")
  config.cad.generation.max_new_tokens = 96
  config.cad.generation.batch_size = 64
  config.cad.phase1_repeats = 2  # the recipe's phase1_278k.json listed twice
  # 3 passes (CaD-VI: 1): one pass of this little data leaves the summary format unlearned.
  config.cad.epochs = 3.0

  config.optim.trainable = r".*\.lora_[ab]|projector\..*"
  config.optim.lr = 2e-3
  config.optim.lr_groups = ((r"projector\..*", 5e-4),)
  config.optim.schedule = "cosine"
  config.optim.warmup_ratio = 0.03
  config.train.batch_size = 32
  config.train.log_every = 20

  config.checkpoint.every_steps = 50
  config.checkpoint.keep = 1

  config.eval.yes_no = 200
  config.eval.grounding = 0
  config.eval.captions = 0
  config.eval.batch_size = 50
  config.cad_eval.selection = 200
  config.cad_eval.summaries = 100
  config.cad_eval.summary_tokens = 96
  config.cad_eval.batch_size = 50
  return config
