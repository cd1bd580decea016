"""Qwen2-VL and Qwen2.5-VL against transformers: M-RoPE positions, logits, export, greedy decoding, refusals."""

import json

import numpy as np
import pytest
import torch
import transformers

from lvlm_jax.errors import UserError
from lvlm_jax.models import hf
from lvlm_jax.models.qwen2_vl import Qwen2VL, rope_index
from lvlm_jax.models.qwen2_vl_vision import Qwen2VLImages

TOL = 1e-4  # of the logits' magnitude
IMAGE, VIDEO, START, END = 120, 121, 122, 123
# Three images of different sizes, in patches (frames, rows, cols): 4, 6 and 6 merged tokens.
GRIDS = [(1, 4, 4), (1, 4, 6), (1, 6, 4)]
PATCH_DIM = 3 * 2 * 14 * 14


# Qwen2.5-VL's windows are 56 pixels (2 x 2 merge blocks) a side: the 4 x 6 and 6 x 4 patch
# images span 2 windows; block 0 attends within windows, block 1 over the whole image.
VISION = {
    "qwen2_vl": dict(embed_dim=32, hidden_size=64, mlp_ratio=2),
    "qwen2_5_vl": dict(hidden_size=32, out_hidden_size=64, intermediate_size=48, window_size=56,
                       fullatt_block_indexes=[1]),
}
CLASSES = {
    "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (transformers.Qwen2_5_VLConfig,
                   transformers.Qwen2_5_VLForConditionalGeneration),
}


def tiny_config(family, **model):
  return CLASSES[family][0](
      text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                        "rope_theta": 10000.0},
                       bos_token_id=1, eos_token_id=2, pad_token_id=0),
      vision_config=dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2,
                         temporal_patch_size=2, **VISION[family]),
      image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
      vision_end_token_id=END, **model)


@pytest.fixture(scope="module", params=list(CLASSES))
def qwen(request, tmp_path_factory):
  torch.manual_seed(0)
  ref = CLASSES[request.param][1](tiny_config(request.param)).eval()
  directory = str(tmp_path_factory.mktemp(request.param))
  ref.save_pretrained(directory)
  return directory, ref, hf.load_lvlm(directory)


def _image_tokens(grid):
  return [START] + [IMAGE] * (grid[0] * grid[1] * grid[2] // 4) + [END]


def _batch(left_padding: bool):
  """Row 0: two images of different sizes with text around them; row 1: one image, a padded
  image slot. Our (ids, mask, images) and transformers' (pixel_values, image_grid_thw)."""
  rows = [[5, 6] + _image_tokens(GRIDS[0]) + [7] + _image_tokens(GRIDS[1]) + [8, 9],
          [10, 11, 12] + _image_tokens(GRIDS[2]) + [13]]
  width = max(map(len, rows))
  ids, mask = np.zeros((2, width), np.int32), np.zeros((2, width), np.int32)
  for i, row in enumerate(rows):
    span = slice(width - len(row), width) if left_padding else slice(0, len(row))
    ids[i, span], mask[i, span] = row, 1
  rng = np.random.default_rng(0)
  patches = [rng.normal(size=(t * h * w, PATCH_DIM)).astype(np.float32) for t, h, w in GRIDS]
  ours = np.full((2, 40, PATCH_DIM), 1e3, np.float32)  # padding patches: never attended
  ours[0, :40] = np.concatenate(patches[:2])
  ours[1, :24] = patches[2]
  grids = np.zeros((2, 2, 3), np.int32)
  grids[0, 0], grids[0, 1], grids[1, 0] = GRIDS
  theirs = dict(pixel_values=torch.tensor(np.concatenate(patches)),
                image_grid_thw=torch.tensor(GRIDS))
  return ids, mask, Qwen2VLImages(ours, grids), theirs


def _torch_logits(ref, ids, mask, theirs):
  with torch.no_grad():
    return ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
               mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
               **theirs).logits.numpy()


def assert_logits_close(ours, expected, mask):
  """Within TOL of the logits' magnitude on the real (unpadded) positions."""
  real = mask.astype(bool)
  diff = np.abs(ours[real] - expected[real]).max()
  scale = np.abs(expected[real]).max()
  assert diff <= TOL * scale, (diff, scale)


@pytest.mark.parametrize("left_padding", [False, True])
def test_rope_index_matches_transformers(qwen, left_padding):
  _, ref, model = qwen
  ids, mask, images, theirs = _batch(left_padding)
  expected, deltas = ref.model.get_rope_index(
      torch.tensor(ids, dtype=torch.long), torch.tensor((ids == IMAGE).astype(np.int64)),
      image_grid_thw=theirs["image_grid_thw"], attention_mask=torch.tensor(mask))
  positions, offsets = rope_index(ids, mask, images.grids, IMAGE, 2)
  real = np.broadcast_to(mask.astype(bool), expected.shape)
  np.testing.assert_array_equal(np.asarray(positions)[real], expected.numpy()[real])
  np.testing.assert_array_equal(np.asarray(offsets), deltas[:, 0].numpy())
  # Row 0's second image (2 x 3 merged tokens) comes after 6 text tokens and the first image's
  # span of 2: at 8, its rows 8..9, columns 8..10; the text after it goes on at 11.
  row0 = np.asarray(positions)[:, 0][:, mask[0].astype(bool)]
  second = slice(2 + 1 + 4 + 1 + 1 + 1, 2 + 1 + 4 + 1 + 1 + 1 + 6)
  np.testing.assert_array_equal(row0[:, second], [[8] * 6, [8, 8, 8, 9, 9, 9], [8, 9, 10] * 2])
  assert list(row0[:, second.stop]) == [11] * 3


def test_logits_match_transformers_with_images_of_two_sizes(qwen):
  _, ref, model = qwen
  assert isinstance(model, Qwen2VL)
  ids, mask, images, theirs = _batch(left_padding=False)
  logits, _ = model(ids, attention_mask=mask, pixel_values=images)
  assert_logits_close(np.asarray(logits), _torch_logits(ref, ids, mask, theirs), mask)


def test_export_reloads_in_transformers_with_equal_logits(qwen, tmp_path):
  directory, ref, model = qwen
  hf.save_hf(model, str(tmp_path))
  config = json.load(open(tmp_path / "config.json"))
  assert config["model_type"] == ref.config.model_type
  assert config["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 3]
  reloaded = type(ref).from_pretrained(str(tmp_path)).eval()
  ids, mask, images, theirs = _batch(left_padding=True)
  logits, _ = model(ids, attention_mask=mask, pixel_values=images)
  assert_logits_close(np.asarray(logits), _torch_logits(reloaded, ids, mask, theirs), mask)
  # The same tensor names as transformers' own save.
  from safetensors import safe_open
  with safe_open(str(tmp_path / "model.safetensors"), "np") as ours, \
       safe_open(f"{directory}/model.safetensors", "np") as theirs_file:
    assert sorted(ours.keys()) == sorted(theirs_file.keys())


def test_training_logprobs_turn_by_mrope(qwen):
  """The training losses' teacher-forced log-probs read a batch's patch_grids and run M-RoPE."""
  from lvlm_jax.training.losses import token_logprobs
  _, ref, model = qwen
  ids, mask, images, theirs = _batch(left_padding=False)
  batch = dict(input_ids=ids, attention_mask=mask, pixel_values=images.patches,
               patch_grids=images.grids)
  ours = np.asarray(token_logprobs(model, batch))
  logp = torch.log_softmax(torch.tensor(_torch_logits(ref, ids, mask, theirs)), -1).numpy()
  expected = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
  real = mask[:, 1:].astype(bool)
  np.testing.assert_allclose(ours[:, 1:][real], expected[real], atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers_generate(qwen):
  """Left-padded prompts with images of two sizes (two in one row) decode greedily as
  transformers' generate: M-RoPE positions after the prompt continue from the rope deltas."""
  from lvlm_jax.sampling.decode import SamplingConfig, generate
  _, ref, model = qwen
  ids, mask, images, theirs = _batch(left_padding=True)
  new = 10
  out = generate(model, ids, mask, pixel_values=images,
                 config=SamplingConfig(max_new_tokens=new, min_new_tokens=new, eos_token_ids=(2,)))
  with torch.no_grad():
    expected = ref.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                            attention_mask=torch.tensor(mask),
                            mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
                            **theirs, do_sample=False, pad_token_id=0, max_new_tokens=new,
                            min_new_tokens=new, eos_token_id=2, return_dict_in_generate=True,
                            output_logits=True)
  tokens = expected.sequences[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(np.asarray(out.tokens), tokens)
  # The log-probs too, which see every position's rotation (a greedy choice of a tiny random
  # model rarely does): transformers' raw logits at the chosen tokens.
  logp = torch.log_softmax(torch.stack(expected.logits, 1).float(), -1).numpy()
  np.testing.assert_allclose(np.asarray(out.logprobs),
                             np.take_along_axis(logp, tokens[..., None], -1)[..., 0],
                             atol=1e-4, rtol=0)


def test_beam_search_matches_transformers(qwen):
  """Each prompt's beams continue its M-RoPE positions (its rope offsets copied to them): 3 beams
  over both prompts, the best 2 returned, as transformers' beam search finds and scores them."""
  from lvlm_jax.sampling.beam import BeamConfig, beam_search
  _, ref, model = qwen
  ids, mask, images, theirs = _batch(left_padding=True)
  new = 6
  out = beam_search(model, ids, mask, pixel_values=images,
                    config=BeamConfig(num_beams=3, num_return_sequences=2, max_new_tokens=new,
                                      min_new_tokens=new, eos_token_ids=(2,)))
  with torch.no_grad():
    expected = ref.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                            attention_mask=torch.tensor(mask),
                            mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
                            **theirs, do_sample=False, num_beams=3, num_return_sequences=2,
                            max_new_tokens=new, min_new_tokens=new, eos_token_id=2,
                            pad_token_id=0, return_dict_in_generate=True, output_scores=True)
  np.testing.assert_array_equal(np.asarray(out.tokens).reshape(4, new),
                                expected.sequences[:, ids.shape[1]:].numpy())
  np.testing.assert_allclose(np.asarray(out.scores).reshape(4),
                             expected.sequences_scores.numpy(), atol=1e-5, rtol=0)


def test_in_memory_names_and_tied_embeddings_load(qwen, tmp_path):
  """transformers 5's in-memory names (`model.language_model.*`, `model.visual.*`) load as the
  hub's; with tied embeddings (Qwen2-VL-2B) the output projection is the embedding."""
  from safetensors.numpy import load_file, save_file
  directory, ref, model = qwen
  tensors = load_file(f"{directory}/model.safetensors")
  renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else
              "model." + k if k.startswith("visual.") else k): v for k, v in tensors.items()}
  assert "model.visual.merger.mlp.0.weight" in renamed
  save_file(renamed, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(open(f"{directory}/config.json").read())
  ids, mask, images, theirs = _batch(left_padding=True)
  expected, _ = model(ids, attention_mask=mask, pixel_values=images)
  logits, _ = hf.load_lvlm(str(tmp_path))(ids, attention_mask=mask, pixel_values=images)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected))

  torch.manual_seed(1)
  tied = type(ref)(tiny_config(ref.config.model_type, tie_word_embeddings=True)).eval()
  tied.save_pretrained(str(tmp_path / "tied"))
  ours = hf.load_lvlm(str(tmp_path / "tied"))
  assert ours.llm.lm_head is None
  logits, _ = ours(ids, attention_mask=mask, pixel_values=images)
  assert_logits_close(np.asarray(logits), _torch_logits(tied, ids, mask, theirs), mask)


def test_flat_transformers4_config_reads_as_the_nested_one(qwen):
  config = qwen[2].config
  nested = config.to_hf()
  flat = {**{k: v for k, v in nested.items() if k != "text_config"}, **nested["text_config"],
          "model_type": config.MODEL_TYPE}
  rope = flat.pop("rope_parameters")
  flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
  flat["rope_theta"] = rope["rope_theta"]
  flat["vision_config"] = {**flat["vision_config"], "model_type": config.MODEL_TYPE}
  assert type(config).from_hf(flat) == config


def test_refusals(qwen):
  config = qwen[2].config.to_hf()
  read = type(qwen[2].config).from_hf

  def with_text(**changes):
    return {**config, "text_config": {**config["text_config"], **changes}}

  rope = config["text_config"]["rope_parameters"]
  with pytest.raises(UserError, match="rope_type 'linear' is not supported"):
    read(with_text(rope_parameters={**rope, "rope_type": "linear", "factor": 2}))
  with pytest.raises(UserError, match=r"mrope_section \[2, 3, 4\] must be 3 sizes adding up to "
                                      r"head_dim / 2 = 8"):
    read(with_text(rope_parameters={**rope, "mrope_section": [2, 3, 4]}))
  with pytest.raises(UserError, match="vision_config.rope_parameters.rope_type 'default'"):
    read({**config, "vision_config": {
        **config["vision_config"], "rope_parameters": {"rope_type": "default"}}})
  out = "out_hidden_size" if config["model_type"] == "qwen2_5_vl" else "hidden_size"
  with pytest.raises(UserError, match="vision_config.hidden_size 48 must equal"):
    read({**config, "vision_config": {**config["vision_config"], out: 48}})
  if config["model_type"] == "qwen2_5_vl":
    with pytest.raises(UserError, match=r"fullatt_block_indexes \[2\] must be blocks of the 2"):
      read({**config, "vision_config": {**config["vision_config"], "fullatt_block_indexes": [2]}})

