"""SC-Tune on the shapes world, from the quickstart model, on a CPU.

    python -m lvlm_jax.train --config configs/quickstart.py      # the starting model, first
    python -m lvlm_jax.train --config configs/sctune_shapes.py

The released recipe's cycle (configs/sctune_llava15_7b.py) at toy scale: describer phases of PPO
on the model's own sampled descriptions of true boxes, rewarded by the IoU of the box its frozen
snapshot finds from each description, alternating with locator phases of SFT on the snapshot's
descriptions and the true boxes. The quickstart describes most objects by colour and shape alone,
which fails where a neighbour shares both: that is the self-consistency gap the describer phase
is rewarded for closing. Self-consistency, REC (grounding) and yes/no accuracy are measured before
and after (workdir/sctune_shapes/summary.json).
"""

from lvlm_jax.dataclass_config import sibling_config
from lvlm_jax.methods import sctune


def get_config():
  config = sctune.default_config()
  quickstart = sibling_config(__file__, "quickstart.py")

  config.model.hf_dir = "workdir/quickstart/export/hf"
  config.model.tokenizer = ""  # the export's own

  # The starting model's own world; the boxes come from scenes no stage trained on.
  config.data.shapes = quickstart.data.shapes
  config.data.num_boxes = 4000
  config.data.pipeline.system_prompt = ""  # as quickstart trained
  config.data.pipeline.length_buckets = quickstart.data.pipeline.length_buckets

  # The released cycle, shortened: 200 describer / 100 locator steps become 20 / 10, and the
  # learning rates of a 7B model (5e-7 / 1e-6) those of a 64-wide one trained from scratch.
  config.sctune.describer_steps = 20
  config.sctune.locator_steps = 10
  config.sctune.describer_lr = 1e-4
  config.sctune.locator_lr = 2e-4
  config.sctune.max_description_tokens = 16
  config.sctune.max_box_tokens = 16

  config.optim.trainable = r"llm\..*|projector\..*"  # the vision tower frozen (SC-Tune: fix_vit)
  config.optim.weight_decay = 0.0
  config.train.num_steps = 60
  config.train.batch_size = 32
  config.train.log_every = 5

  config.checkpoint.every_steps = 10
  config.checkpoint.keep = 1
  config.checkpoint.export_lora = False

  config.eval.yes_no = 200
  config.eval.grounding = 100
  config.eval.captions = 0
  config.eval.self_consistency = 100
  config.eval.batch_size = 50
  config.eval.box_tokens = quickstart.eval.box_tokens
  return config
