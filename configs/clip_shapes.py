"""A small CLIP for the shapes world, trained from scratch: the scorer of configs/csr_shapes.py.

    python -m lvlm_jax.train --config configs/clip_shapes.py   # about a minute or two on a CPU

Symmetric InfoNCE (learned temperature) on images of the quickstart's world against the sentences
of their captions; reports held-out image -> sentence retrieval accuracy and exports an HF CLIP
folder to workdir/clip_shapes/export/hf (transformers' CLIPModel loads it).
"""

import os

from lvlm_jax.dataclass_config import load_config_file
from lvlm_jax.methods import clip


def get_config():
  config = clip.default_config()
  # The world the LVLM was trained on (configs/quickstart.py), other scenes of it.
  config.train.shapes = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "quickstart.py")).data.shapes
  config.train.num_steps = 1000
  config.train.batch_size = 64
  config.train.lr = 1e-3
  config.train.eval_images = 500
  return config
