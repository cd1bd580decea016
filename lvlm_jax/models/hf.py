"""HuggingFace checkpoints in and out: safetensors <-> our NNX models, tensor by tensor.

Loading builds the model abstractly (`nnx.eval_shape`), then reads one tensor at a time from the
safetensors files and places it straight onto its shards of the mesh, so a large model never
exists twice in one host's memory. Export merges LoRA adapters on the fly and writes safetensors
shards with an index plus a `config.json` that transformers loads.

Name mapping is one rule table per model family (our dotted parameter path -> HF tensor name);
composite models (CLIP, LLaVA) prefix their parts, trying each key layout that exists in the wild.
"""

import contextlib
import functools
import json
import os
import re
import stat
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from lvlm_jax.errors import UserError
from lvlm_jax.models.clip import CLIPConfig, CLIPModel
from lvlm_jax.models.dinov2 import DINOv2Config, DINOv2Tower
from lvlm_jax.models.llava_next import LlavaNext, LlavaNextConfig, LlavaOnevisionConfig
from lvlm_jax.models.llm import LLM, LLMConfig
from lvlm_jax.models.lora import linear_layers
from lvlm_jax.models.lvlm import LVLM, LVLMConfig
from lvlm_jax.models.qwen2_vl import Qwen25VLConfig, Qwen2VL, Qwen2VLConfig
from lvlm_jax.models.siglip import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionTower
from lvlm_jax.models.vision import CLIPVisionConfig, CLIPVisionTower
from lvlm_jax.sharding import variable_sharding

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Our path (after kernel/scale/embedding -> weight) -> HF name, per family. First full match wins.
LLM_RULES = [
    (r"embed_tokens\.weight", r"model.embed_tokens.weight"),
    (r"layers\.(\d+)\.input_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.post_attn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.attn\.(\w+)\.(weight|bias)", r"model.layers.\1.self_attn.\2.\3"),
    (r"layers\.(\d+)\.mlp\.(\w+)\.(weight|bias)", r"model.layers.\1.mlp.\2.\3"),
    (r"norm\.weight", r"model.norm.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
]
CLIP_ENCODER_RULES = [
    (r"layers\.(\d+)\.norm(1|2)\.(weight|bias)", r"encoder.layers.\1.layer_norm\2.\3"),
    (r"layers\.(\d+)\.attn\.(\w+)\.(weight|bias)", r"encoder.layers.\1.self_attn.\2.\3"),
    (r"layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
]
# SigLIP's vision tower has CLIP's names (a biased patch embedding, no class token or pre_norm).
CLIP_VISION_RULES = CLIP_ENCODER_RULES + [
    (r"patch_embed\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"class_embedding", r"embeddings.class_embedding"),
    (r"position_embedding", r"embeddings.position_embedding.weight"),
    (r"pre_norm\.(weight|bias)", r"pre_layrnorm.\1"),
    (r"post_norm\.(weight|bias)", r"post_layernorm.\1"),
]
CLIP_TEXT_RULES = CLIP_ENCODER_RULES + [
    (r"token_embedding\.weight", r"embeddings.token_embedding.weight"),
    (r"position_embedding", r"embeddings.position_embedding.weight"),
    (r"final_norm\.(weight|bias)", r"final_layer_norm.\1"),
]
SIGLIP_TEXT_RULES = CLIP_TEXT_RULES + [(r"head\.(weight|bias)", r"head.\1")]
# SigLIP's attention-pooling head: torch's nn.MultiheadAttention packs q, k, v in one projection.
SIGLIP_HEAD_RULES = [
    (r"probe", r"head.probe"),
    (r"in_proj\.(weight|bias)", r"head.attention.in_proj_\1"),
    (r"out_proj\.(weight|bias)", r"head.attention.out_proj.\1"),
    (r"norm\.(weight|bias)", r"head.layernorm.\1"),
    (r"mlp\.(fc1|fc2)\.(weight|bias)", r"head.mlp.\1.\2"),
]
SIGLIP_MODEL_RULES = [(r"(logit_scale|logit_bias)", r"\1")]
DINOV2_RULES = [
    (r"layers\.(\d+)\.norm(1|2)\.(weight|bias)", r"encoder.layer.\1.norm\2.\3"),
    (r"layers\.(\d+)\.attn\.q_proj\.(weight|bias)", r"encoder.layer.\1.attention.attention.query.\2"),
    (r"layers\.(\d+)\.attn\.k_proj\.(weight|bias)", r"encoder.layer.\1.attention.attention.key.\2"),
    (r"layers\.(\d+)\.attn\.v_proj\.(weight|bias)", r"encoder.layer.\1.attention.attention.value.\2"),
    (r"layers\.(\d+)\.attn\.out_proj\.(weight|bias)", r"encoder.layer.\1.attention.output.dense.\2"),
    (r"layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layer.\1.mlp.\2.\3"),
    (r"layers\.(\d+)\.layer_scale(1|2)", r"encoder.layer.\1.layer_scale\2.lambda1"),
    (r"patch_embed\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"cls_token", r"embeddings.cls_token"),
    (r"position_embeddings", r"embeddings.position_embeddings"),
    (r"final_norm\.(weight|bias)", r"layernorm.\1"),
]
# Qwen2-VL's and Qwen2.5-VL's tower: our names are transformers' but for the Conv3d patch embedding and the
# merger MLP's nn.Sequential indices.
QWEN2VL_VISION_RULES = [
    (r"patch_proj\.weight", r"patch_embed.proj.weight"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2|gate_proj|up_proj|down_proj)\.(weight|bias)",
     r"blocks.\1.mlp.\2.\3"),
    (r"merger\.ln_q\.(weight|bias)", r"merger.ln_q.\1"),
    (r"merger\.fc1\.(weight|bias)", r"merger.mlp.0.\1"),
    (r"merger\.fc2\.(weight|bias)", r"merger.mlp.2.\1"),
]
PROJECTOR_RULES = [(r"(linear_1|linear_2)\.(weight|bias)", r"\1.\2")]
CLIP_MODEL_RULES = [
    (r"(visual_projection|text_projection)\.weight", r"\1.weight"),
    (r"logit_scale", r"logit_scale"),
]
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Checkpoint tensors that are no parameter of any model, accepted unread: buffers that older
# transformers versions saved (RoPE frequencies, CLIP's position ids), recomputed from the config.
KNOWN_EXTRAS = r"(.*\.)?(rotary_emb\.inv_freq|position_ids)"
# Tensors an HF config describes that no model here reads, by vision model_type and the config
# key that adds them (names within the tower): SigLIP's attention-pooling head makes only the
# image-text model's pooled embedding; DINOv2's mask token serves only masked-image pretraining.
UNREAD_BY_DESIGN = {
    "siglip_vision_model": ("vision_use_head", r"head\..*"),
    "dinov2": ("use_mask_token", r"embeddings\.mask_token"),
}
# A LLaVA's tower, or a tower saved on its own, in every layout `llava_names` reads.
_TOWER_PREFIX = r"(?:(?:model\.)?vision_tower\.)?(?:vision_model\.)?"
# How many unused tensor names an error lists.
_LISTED = 3


def _apply_rules(rules, path: str) -> str | None:
  for pattern, template in rules:
    match = re.fullmatch(pattern, path)
    if match:
      return match.expand(template)
  return None


def _hf_path(path: str) -> str:
  parts = path.split(".")
  return ".".join(parts[:-1] + [_LEAF_NAMES.get(parts[-1], parts[-1])])


def _prefixed(prefixes: tuple[str, ...], rules, rest: str) -> list[str]:
  name = _apply_rules(rules, rest)
  return [] if name is None else [p + name for p in prefixes]


def llm_names(path: str) -> list[str]:
  name = _apply_rules(LLM_RULES, _hf_path(path))
  return [] if name is None else [name]


def clip_vision_names(path: str) -> list[str]:
  """A CLIPVisionModel's or SiglipVisionModel's tensors (SiglipVisionModel: CLIP's names), in the
  hub layout we export or as transformers 5 saves a vision model alone (without `vision_model.`)."""
  return _prefixed(("vision_model.", ""), CLIP_VISION_RULES, _hf_path(path))


def dinov2_names(path: str) -> list[str]:
  """A Dinov2Model's tensors, in the hub's names (transformers renames them as it loads)."""
  return _prefixed(("",), DINOV2_RULES, _hf_path(path))


def clip_names(path: str) -> list[str]:
  head, _, rest = path.partition(".")
  if head == "vision":
    return _prefixed(("vision_model.",), CLIP_VISION_RULES, _hf_path(rest))
  if head == "text":
    return _prefixed(("text_model.",), CLIP_TEXT_RULES, _hf_path(rest))
  name = _apply_rules(CLIP_MODEL_RULES, _hf_path(path))
  return [] if name is None else [name]


def siglip_names(path: str) -> list[str]:
  """A SiglipModel's tensors: CLIPModel's layout with the text head, the vision pooling head and
  the logit bias."""
  head, _, rest = path.partition(".")
  prefixed = {"vision": ("vision_model.", CLIP_VISION_RULES),
              "vision_head": ("vision_model.", SIGLIP_HEAD_RULES),
              "text": ("text_model.", SIGLIP_TEXT_RULES)}
  if head in prefixed:
    prefix, rules = prefixed[head]
    return _prefixed((prefix,), rules, _hf_path(rest))
  name = _apply_rules(SIGLIP_MODEL_RULES, _hf_path(path))
  return [] if name is None else [name]


def llava_names(path: str, vision_type: str = "clip_vision_model") -> list[str]:
  """Candidates in order; the first is what we export (the llava-hf hub layout, which transformers
  and vLLM both read). transformers 5 in memory uses `model.language_model.*` / `model.vision_tower.*`
  and its save_pretrained writes `vision_tower.*` without `vision_model.`. vision_type: the
  tower's HF model_type (DINOv2 has neither `vision_model.` nor CLIP's names). LLaVA-NeXT adds
  `image_newline`."""
  if path == "image_newline":
    return ["image_newline", "model.image_newline"]
  head, _, rest = path.partition(".")
  if head == "vision" and vision_type == "dinov2":
    return _prefixed(("vision_tower.", "model.vision_tower."), DINOV2_RULES, _hf_path(rest))
  if head == "vision":
    return _prefixed(("vision_tower.vision_model.", "vision_tower.", "model.vision_tower."),
                     CLIP_VISION_RULES, _hf_path(rest))
  if head == "projector":
    return _prefixed(("multi_modal_projector.", "model.multi_modal_projector."), PROJECTOR_RULES,
                     _hf_path(rest))
  if head == "llm":
    name = _apply_rules(LLM_RULES, _hf_path(rest))
    if name is None:
      return []
    if name.startswith("model."):
      inner = name[len("model."):]
      return ["language_model.model." + inner, "model.language_model." + inner]
    return ["language_model." + name, name]
  return []


def qwen2_vl_names(path: str) -> list[str]:
  """A Qwen2VLForConditionalGeneration's tensors: the hub layout first (what transformers 5
  also saves), then the module names transformers 5 holds in memory (`model.language_model.*`,
  `model.visual.*`)."""
  head, _, rest = path.partition(".")
  if head == "vision":
    return _prefixed(("visual.", "model.visual."), QWEN2VL_VISION_RULES, _hf_path(rest))
  if head == "llm":
    name = _apply_rules(LLM_RULES, _hf_path(rest))
    if name is None:
      return []
    if name.startswith("model."):
      return [name, "model.language_model." + name[len("model."):]]
    return [name]
  return []


def to_ours(path: str, hf_array: np.ndarray) -> np.ndarray:
  """An HF tensor in our layout: torch Linear (out, in) -> (in, out); conv (D, C, kh, kw) -> (kh*kw*C, D);
  Qwen2-VL's Conv3d (D, C, T, kh, kw), which sees each patch whole, -> (C*T*kh*kw, D)."""
  if path.endswith("patch_proj.kernel"):
    return hf_array.reshape(hf_array.shape[0], -1).T
  if path.endswith("patch_embed.kernel"):
    return hf_array.transpose(2, 3, 1, 0).reshape(-1, hf_array.shape[0])
  if path.endswith(".kernel"):
    return hf_array.T
  return hf_array


def to_hf(path: str, array: np.ndarray, hf_shape: tuple[int, ...] | None = None) -> np.ndarray:
  """Inverse of `to_ours`. A conv kernel needs its HF shape: (D, C, kh, kw) or (D, C, T, kh, kw)."""
  if path.endswith("patch_proj.kernel"):
    return array.T.reshape(hf_shape)
  if path.endswith("patch_embed.kernel"):
    d, c, kh, kw = hf_shape
    return array.reshape(kh, kw, c, d).transpose(3, 2, 0, 1)
  if path.endswith(".kernel"):
    return array.T
  return array


class CheckpointReader:
  """Random access to the tensors of an HF checkpoint directory (one file or an index of shards)."""

  def __init__(self, directory: str, *, allow_pickle: bool = False):
    self.directory = directory
    self._files: dict[str, str] = {}
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
      self._files = _shards_of_index(index)
    elif os.path.exists(single):
      with _open_safetensors(single) as f:
        self._files = {name: single for name in f.keys()}
    else:
      pickled = [f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES)]
      if pickled and not allow_pickle:
        raise UserError(f"{directory} holds only pickled weights ({pickled[0]}); pickles can run "
                        "code when loaded. Convert them to safetensors, or pass allow_pickle=True "
                        "(--allow_pickle) if you trust the file")
      if not pickled:
        raise UserError(f"{directory}: no model.safetensors or model.safetensors.index.json found")
      self._pickled = self._load_pickles(directory, pickled)
      self._files = {name: "" for name in self._pickled}

  @staticmethod
  def _load_pickles(directory: str, files: list[str]) -> dict[str, np.ndarray]:
    import torch  # only on this opt-in path
    tensors = {}
    for fname in sorted(files):
      try:
        state = torch.load(os.path.join(directory, fname), map_location="cpu", weights_only=True)
      except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise UserError(f"{os.path.join(directory, fname)}: cannot be loaded ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})") from None
      tensors.update({k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                      for k, v in state.items()})
    return tensors

  def __contains__(self, name: str) -> bool:
    return name in self._files

  def keys(self) -> list[str]:
    return list(self._files)

  def get(self, name: str) -> np.ndarray:
    path = self._files[name]
    if not path:
      return self._pickled[name]
    # Opened per tensor: safe_open maps the whole file, and every page a read touches stays
    # resident (and counts in this process's RSS) until the map closes, so one handle kept for
    # the whole load would end with the checkpoint resident beside the model. Reopening costs
    # about 0.5 ms a tensor (the benchmarks' 68M model: 1.57 -> 1.67 s, peak 580 -> 310 MiB).
    with _open_safetensors(path) as f:
      try:
        return f.get_tensor(name)
      except Exception as e:  # safetensors' SafetensorError: a file cut short after its header
        raise UserError(f"{path}: tensor {name} cannot be read ({' '.join(str(e).split())}); "
                        "the file is damaged or incomplete: download or convert it again") from None


@contextlib.contextmanager
def _open_safetensors(path: str):
  """safe_open(path), with a damaged, empty or missing file as a UserError naming it."""
  try:
    handle = safe_open(path, "np")
  except FileNotFoundError:
    raise UserError(f"{path}: no such file") from None
  except Exception as e:  # SafetensorError (header too small, invalid JSON header, ...), OSError
    raise UserError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())}); it "
                    "is damaged or incomplete: download or convert it again") from None
  with handle as f:
    yield f


def _shards_of_index(index: str) -> dict[str, str]:
  """tensor name -> shard file of a `model.safetensors.index.json`, every shard checked present."""
  directory = os.path.dirname(index)
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = {name: os.path.join(directory, fname) for name, fname in weight_map.items()}
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{index}: not valid JSON ({e})") from None
  except (KeyError, TypeError, AttributeError):
    raise UserError(f"{index}: expected an object with a 'weight_map' of tensor -> file") from None
  for path in sorted(set(files.values())):
    if not os.path.isfile(path):
      raise UserError(f"{index} names the shard {os.path.basename(path)}, which is missing from "
                      f"{directory}")
  return files


def read_hf_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{directory}: no config.json; expected an HF model directory")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None


def _place(array: np.ndarray, variable: nnx.Variable, mesh: Mesh | None) -> jax.Array:
  if mesh is None:
    return jnp.asarray(array)
  sharding = variable_sharding(variable, mesh)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def fill_from_checkpoint(abstract_model: nnx.Module, reader: CheckpointReader,
                         names: Callable[[str], list[str]], mesh: Mesh | None = None, *,
                         allow_unused: str | None = None) -> nnx.Module:
  """Replaces every abstract parameter of the model with its tensor from the checkpoint.

  LoRA adapters are not part of HF checkpoints and keep their initial values. A checkpoint tensor
  that fills no parameter is an error (the config describes another model: fewer layers, another
  family), unless its name matches KNOWN_EXTRAS or the regular expression allow_unused.
  """
  _check_no_unused(abstract_model, reader, names, allow_unused)
  graphdef, state = nnx.split(abstract_model)
  flat = nnx.to_flat_state(state)
  for key, variable in flat:
    path = ".".join(str(k) for k in key)
    if isinstance(variable, nnx.LoRAParam) or not isinstance(variable, nnx.Param):
      if isinstance(variable.get_value(), jax.ShapeDtypeStruct):
        raise ValueError(f"{path}: abstract non-checkpoint state; create the model concretely")
      continue
    candidates = names(path)
    if not candidates:
      raise ValueError(f"no HF name rule for parameter {path}")
    found = next((c for c in candidates if c in reader), None)
    if found is None:
      raise UserError(f"{reader.directory}: tensor {candidates[0]} (for {path}) is missing from "
                      "the checkpoint")
    target = variable.get_value()
    array = to_ours(path, reader.get(found))
    if tuple(array.shape) != tuple(target.shape):
      raise UserError(f"{reader.directory}: tensor {found} has shape {tuple(array.shape)} in our "
                      f"layout, the model expects {tuple(target.shape)} (for {path})")
    # copy=False: the tensor is already a fresh host copy; a second one only raises the peak.
    variable.set_value(_place(array.astype(target.dtype, copy=False), variable, mesh))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _check_no_unused(abstract_model: nnx.Module, reader: CheckpointReader,
                     names: Callable[[str], list[str]], allow_unused: str | None) -> None:
  """Raises UserError naming the checkpoint tensors that no parameter of the model reads."""
  used = set()
  for key, _ in nnx.to_flat_state(nnx.state(abstract_model, nnx.Param)):
    used.update(names(".".join(str(k) for k in key)))
  accepted = KNOWN_EXTRAS if allow_unused is None else f"{KNOWN_EXTRAS}|(?:{allow_unused})"
  unused = sorted(n for n in reader.keys() if n not in used and not re.fullmatch(accepted, n))
  if unused:
    listed = ", ".join(unused[:_LISTED]) + (", ..." if len(unused) > _LISTED else "")
    raise UserError(f"{reader.directory}: {len(unused)} checkpoint tensors are not used by the "
                    f"model its config.json describes ({listed}); fix the config (e.g. "
                    "num_hidden_layers), or pass allow_unused=REGEX (convert: --allow_unused) "
                    "to load without them")


def load_llm(directory: str, **kwargs) -> LLM:
  """An HF LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM directory -> LLM."""
  return _load_expecting(LLM, directory, **kwargs)


def load_clip(directory: str, **kwargs) -> CLIPModel:
  """An HF CLIPModel directory -> CLIPModel (both towers, projections, logit scale)."""
  return _load_expecting(CLIPModel, directory, **kwargs)


def load_siglip(directory: str, **kwargs) -> SiglipModel:
  """An HF SiglipModel directory -> SiglipModel (an image-text scorer, as `load_clip`)."""
  return _load_expecting(SiglipModel, directory, **kwargs)


def load_clip_vision(directory: str, *, mesh: Mesh | None = None, allow_pickle: bool = False,
                     allow_unused: str | None = None, **config_overrides) -> CLIPVisionTower:
  """The vision tower of an HF CLIPModel or CLIPVisionModel directory (a CLIPModel's text tower
  and projections stay unread)."""
  hf = read_hf_config(directory)
  config = CLIPVisionConfig.from_hf(hf.get("vision_config", hf), **config_overrides)
  model = nnx.eval_shape(lambda: CLIPVisionTower(config, rngs=nnx.Rngs(0)))
  others = r"(?!vision_model\.).*"
  return fill_from_checkpoint(
      model, CheckpointReader(directory, allow_pickle=allow_pickle), clip_vision_names, mesh,
      allow_unused=others if allow_unused is None else f"{others}|(?:{allow_unused})")


def load_lvlm(directory: str, **kwargs) -> LVLM:
  """An HF LlavaForConditionalGeneration (or LlavaNextForConditionalGeneration,
  LlavaOnevisionForConditionalGeneration: a LlavaNext) directory -> LVLM."""
  return _load_expecting(LVLM, directory, **kwargs)


def _load_expecting(model_class, directory: str, **kwargs):
  model = load_model(directory, **kwargs)
  if not isinstance(model, model_class):
    raise UserError(f"{directory}: holds a {type(model).__name__}, expected a {model_class.__name__}")
  return model


def _fixed(names: Callable[[str], list[str]]):
  return lambda config: names


# model_type -> (model class, config class, config -> HF name mapping)
FAMILIES = {
    "llava": (LVLM, LVLMConfig,
              lambda config: functools.partial(llava_names, vision_type=config.vision.MODEL_TYPE)),
    "llava_next": (LlavaNext, LlavaNextConfig,
                   lambda config: functools.partial(llava_names,
                                                    vision_type=config.vision.MODEL_TYPE)),
    "llava_onevision": (LlavaNext, LlavaOnevisionConfig,
                        lambda config: functools.partial(llava_names,
                                                         vision_type=config.vision.MODEL_TYPE)),
    "qwen2_vl": (Qwen2VL, Qwen2VLConfig, _fixed(qwen2_vl_names)),
    "qwen2_5_vl": (Qwen2VL, Qwen25VLConfig, _fixed(qwen2_vl_names)),
    "clip": (CLIPModel, CLIPConfig, _fixed(clip_names)),
    "siglip": (SiglipModel, SiglipConfig, _fixed(siglip_names)),
    "clip_vision_model": (CLIPVisionTower, CLIPVisionConfig, _fixed(clip_vision_names)),
    "siglip_vision_model": (SiglipVisionTower, SiglipVisionConfig, _fixed(clip_vision_names)),
    "dinov2": (DINOv2Tower, DINOv2Config, _fixed(dinov2_names)),
    "llama": (LLM, LLMConfig, _fixed(llm_names)),
    "mistral": (LLM, LLMConfig, _fixed(llm_names)),
    "qwen2": (LLM, LLMConfig, _fixed(llm_names)),
}


def _family(hf_config: dict, where: str):
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise UserError(f"{where}: unsupported model_type {model_type!r}; supported: "
                    f"{', '.join(FAMILIES)}")
  return FAMILIES[model_type]


def model_config(hf_config: dict, where: str = "config", **config_overrides):
  """(model class, its config) for an HF config dict; UserErrors name `where` (the file)."""
  model_class, config_class, _ = _family(hf_config, where)
  try:
    return model_class, config_class.from_hf(hf_config, **config_overrides)
  except UserError as e:
    raise UserError(f"{where}: {e}") from None
  except KeyError as e:  # e.g. a llava config without `text_config`
    raise UserError(f"{where}: the {hf_config.get('model_type')} config has no {e.args[0]!r} "
                    "entry, which it needs") from None


def build_model(hf_config: dict, *, rngs: nnx.Rngs | None = None, **config_overrides) -> nnx.Module:
  """A randomly initialised model of the family and size an HF config dict describes."""
  model_class, config = model_config(hf_config, **config_overrides)
  return model_class(config, rngs=rngs or nnx.Rngs(0))


def load_model(directory: str, *, mesh: Mesh | None = None, allow_pickle: bool = False,
               allow_unused: str | None = None, **config_overrides) -> nnx.Module:
  """Any supported HF directory (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, CLIP,
  SigLIP, a CLIP, SigLIP or DINOv2 vision tower, Llama/Mistral/Qwen2).

  The config is checked before any tensor is read: what we cannot compute as transformers does
  (an unsupported RoPE type, vision tower or text model) is a UserError. allow_unused: a regular
  expression of checkpoint tensor names that may stay unread (see `fill_from_checkpoint`).
  """
  hf_config = read_hf_config(directory)
  where = os.path.join(directory, "config.json")
  model_class, config = model_config(hf_config, where, **config_overrides)
  names = _family(hf_config, where)[2](config)
  model = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))
  reader = CheckpointReader(directory, allow_pickle=allow_pickle)
  unread = [re.escape(h) for h in _tied_head_copies(config, reader, names)]
  unread += _unread_by_design(hf_config)
  if unread:
    allow_unused = "|".join(unread + ([allow_unused] if allow_unused else []))
  return fill_from_checkpoint(model, reader, names, mesh, allow_unused=allow_unused)


def _unread_by_design(hf_config: dict) -> list[str]:
  """Patterns of the tensors the config describes but no model here reads (UNREAD_BY_DESIGN)."""
  if hf_config.get("model_type") == "siglip":  # the image-text model reads its pooling head
    return []
  vision = hf_config.get("vision_config", hf_config)
  key, pattern = UNREAD_BY_DESIGN.get(vision.get("model_type"), (None, None))
  # Both keys default to true in transformers.
  return [_TOWER_PREFIX + pattern] if key and vision.get(key, True) else []


def _tied_head_copies(config, reader: CheckpointReader, names) -> list[str]:
  """The output-projection tensors a checkpoint holds beside tied embeddings: copies of the
  embedding, which are not read. One that differs is refused, as transformers then unties."""
  text = getattr(config, "text", config)
  if not isinstance(text, LLMConfig) or not text.tie_word_embeddings:
    return []
  prefix = "" if text is config else "llm."
  heads = [n for n in names(prefix + "lm_head.kernel") if n in reader]
  embed = next((n for n in names(prefix + "embed_tokens.embedding") if n in reader), None)
  if not heads or embed is None:
    return heads
  embedding = reader.get(embed)
  for head in heads:
    if not np.array_equal(reader.get(head), embedding):
      raise UserError(f"{reader.directory}: config.json ties the embeddings but the checkpoint's "
                      f"{head} differs from {embed}; set tie_word_embeddings to false to use it "
                      "(transformers unties them)")
  return heads


def hf_config(model: nnx.Module) -> dict:
  """The HF config.json dict that describes the model."""
  return model.config.to_hf()


def export_names(model: nnx.Module) -> Callable[[str], list[str]]:
  """Our parameter path -> HF tensor names for this model (the first is what we export)."""
  return _names_and_config(model)[0]


def _names_and_config(model: nnx.Module) -> tuple[Callable[[str], list[str]], dict]:
  config = hf_config(model)
  return _family(config, type(model).__name__)[2](model.config), config


def _to_host(array: jax.Array) -> np.ndarray:
  if not array.is_fully_addressable:
    array = multihost_utils.process_allgather(array, tiled=True)
  return np.asarray(jax.device_get(array), dtype=np.float32)


def hf_tensors(model: nnx.Module) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, float32 host array) for every parameter, LoRA adapters merged into their kernels."""
  names, hf_config = _names_and_config(model)
  adapters = {path: linear.lora for path, linear in linear_layers(model) if linear.lora is not None}
  for key, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if isinstance(variable, nnx.LoRAParam):
      continue
    path = ".".join(str(k) for k in key)
    array = _to_host(variable[...])
    lora = adapters.get(path.removesuffix(".kernel")) if path.endswith(".kernel") else None
    if lora is not None:
      array = array + _to_host(lora.lora_a[...]) @ _to_host(lora.lora_b[...]) * lora.scale
    hf_shape = None
    if path.endswith("patch_proj.kernel"):
      vision = hf_config["vision_config"]
      p = vision["patch_size"]
      hf_shape = (array.shape[1], vision["in_channels"], vision["temporal_patch_size"], p, p)
    if path.endswith("patch_embed.kernel"):
      vision = hf_config.get("vision_config", hf_config)
      p, c = vision["patch_size"], vision.get("num_channels", 3)
      hf_shape = (array.shape[1], c, p, p)
    hf_array = to_hf(path, array, hf_shape)  # ascontiguousarray alone makes a scalar 1-d
    yield names(path)[0], np.ascontiguousarray(hf_array).reshape(hf_array.shape)


def save_hf(model: nnx.Module, directory: str, *, dtype: str = "float32",
            max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `config.json` and safetensors shards (+ an index when more than one) that transformers
  loads. Each shard is written as soon as it is full, so host memory holds at most one shard.

  Every process must call this (sharded arrays are gathered collectively); only process 0 writes.
  """
  _, hf_config = _names_and_config(model)
  hf_config["dtype"] = dtype
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(directory, exist_ok=True)
  shard_files: list[tuple[str, list[str]]] = []
  shard: dict[str, np.ndarray] = {}
  total = 0

  def flush():
    if shard and writer:
      fname = f"shard-{len(shard_files):05d}.safetensors.partial"
      save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
      shard_files.append((fname, list(shard)))
    shard.clear()

  for name, array in hf_tensors(model):
    array = array.astype(jnp.dtype(dtype))
    if shard and sum(a.nbytes for a in shard.values()) + array.nbytes > max_shard_bytes:
      flush()
    shard[name] = array
    total += array.nbytes
  flush()
  if not writer:
    return
  config_file = os.path.join(directory, "config.json")
  with open(config_file, "w") as f:
    json.dump(hf_config, f, indent=2)
  # safetensors writes owner-only files; give them the mode of every other file (the umask's).
  mode = stat.S_IMODE(os.stat(config_file).st_mode)
  for partial, _ in shard_files:
    os.chmod(os.path.join(directory, partial), mode)
  if len(shard_files) == 1:
    os.replace(os.path.join(directory, shard_files[0][0]),
               os.path.join(directory, "model.safetensors"))
    return
  weight_map = {}
  for i, (partial, tensor_names) in enumerate(shard_files):
    fname = f"model-{i + 1:05d}-of-{len(shard_files):05d}.safetensors"
    os.replace(os.path.join(directory, partial), os.path.join(directory, fname))
    weight_map.update({name: fname for name in tensor_names})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
