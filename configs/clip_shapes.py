"""A small CLIP for the shapes world, trained from scratch: the scorer of configs/csr_shapes.py.

    python -m lvlm_jax.train --config configs/clip_shapes.py   # about a minute or two on a CPU

Symmetric InfoNCE (learned temperature) on images of the quickstart's world against the sentences
of their captions; reports held-out image -> sentence retrieval accuracy and exports an HF CLIP
folder to workdir/clip_shapes/export/hf (transformers' CLIPModel loads it).
"""

from lvlm_jax.dataclass_config import sibling_config
from lvlm_jax.methods import clip


def get_config():
  config = clip.default_config()
  # The world the LVLM was trained on (configs/quickstart.py), other scenes of it.
  config.train.shapes = sibling_config(__file__, "quickstart.py").data.shapes
  config.train.num_steps = 1000
  config.train.batch_size = 64
  config.train.lr = 1e-3
  config.train.eval_images = 500
  return config
