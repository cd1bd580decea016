"""Generation benchmarks, lvlm_jax vs transformers on the same weights and prompts.

  python benchmarks/generation.py --workload greedy    # batched greedy decoding with an image each
  python benchmarks/generation.py --workload sample    # several sampled candidates per prompt
  python benchmarks/generation.py --workload sentence  # CSR-style next-sentence beam search

Every row generates exactly `new_tokens` tokens (stop tokens are suppressed with min_new_tokens)
so both frameworks do the same work; the sentence workload runs 5-beam search with an early stop
at '.', like CSR's tree expansion (transformers 5 keeps diverse *group* beam search on the Hub, so
both sides run plain beam search here). Both sides sample with num_return_sequences: lvlm_jax
prefills each prompt once and copies its cache; transformers' generate copies the prompt and
prefills every copy.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import harness  # noqa: E402
import presets  # noqa: E402

PROMPT_TEXT_TOKENS = 32
SAMPLES_PER_PROMPT = 4
SENTENCE_END = 29889  # '.' in LLaMA-2 / Vicuna's vocabulary, as CSR uses it


def prompts(preset: presets.Preset, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """[rows, T] prompts: a few text tokens, one image block, a question; [rows, 1, S, S, 3] pixels."""
  rng = np.random.default_rng(seed)
  p = presets.tokens_per_image(preset)
  ids = rng.integers(3, 32000, (rows, 4 + p + PROMPT_TEXT_TOKENS)).astype(np.int32)
  ids[:, 4:4 + p] = presets.IMAGE_TOKEN_ID
  size = preset.vision["image_size"]
  return ids, rng.normal(size=(rows, 1, size, size, 3)).astype(np.float32)


def _work(workload: str, preset: presets.Preset) -> tuple[int, dict]:
  """(rows, settings) of a workload."""
  new = preset.new_tokens
  if workload == "greedy":
    return preset.batch, dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
  if workload == "sample":
    return preset.batch * SAMPLES_PER_PROMPT, dict(
        max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, top_k=100,
        top_p=0.9)
  if workload == "sentence":
    return preset.batch, dict(max_new_tokens=new, num_beams=5)
  raise ValueError(workload)


def setup_jax(preset_name: str, workload: str, attention: str = "auto"):
  import jax
  import jax.numpy as jnp

  from lvlm_jax.sampling.beam import BeamConfig, beam_search
  from lvlm_jax.sampling.decode import SamplingConfig, generate

  preset = presets.PRESETS[preset_name]
  model = presets.lvlm_jax_model(preset_name, attention)
  rows, settings = _work(workload, preset)
  ids, pixels = prompts(preset, preset.batch)
  if workload == "sample":  # k samples per prompt from one prefill (transformers prefills k times)
    settings = dict(settings, num_return_sequences=SAMPLES_PER_PROMPT)
  ids, pixels = jnp.asarray(ids), jnp.asarray(pixels)
  key = [jax.random.key(0)]

  if workload == "sentence":
    config = BeamConfig(num_beams=settings["num_beams"], max_new_tokens=settings["max_new_tokens"],
                        eos_token_ids=(SENTENCE_END,))

    def run():
      jax.block_until_ready(beam_search(model, ids, config=config, pixel_values=pixels))
  else:
    config = SamplingConfig(eos_token_ids=(2,), **settings)

    def run():
      key[0], sub = jax.random.split(key[0])
      jax.block_until_ready(generate(model, ids, config=config, pixel_values=pixels, rng=sub))
  return run


def setup_torch(preset_name: str, workload: str, attention: str = "auto"):
  del attention  # transformers runs its own (sdpa on CPU)
  import torch
  import transformers

  preset = presets.PRESETS[preset_name]
  model = transformers.LlavaForConditionalGeneration.from_pretrained(
      presets.weights_dir(preset_name)).eval()
  rows, settings = _work(workload, preset)
  ids, pixels = prompts(preset, preset.batch)
  ids = torch.tensor(ids)
  pixels = torch.tensor(pixels[:, 0].transpose(0, 3, 1, 2).copy())
  if workload == "sentence":
    kwargs = dict(num_beams=settings["num_beams"], max_new_tokens=settings["max_new_tokens"],
                  eos_token_id=SENTENCE_END, do_sample=False)
  elif workload == "sample":
    kwargs = dict(settings, num_return_sequences=SAMPLES_PER_PROMPT, eos_token_id=2)
  else:
    kwargs = dict(settings, eos_token_id=2)

  def run():
    with torch.no_grad():
      model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                     pad_token_id=0, **kwargs)
  return run


def main() -> None:
  parser = harness.common_flags(__doc__)
  parser.add_argument("--workload", choices=("greedy", "sample", "sentence"), default="greedy",
                      help="which generation workload to time")
  args = parser.parse_args()
  preset = presets.PRESETS[args.preset]
  rows, _ = _work(args.workload, preset)
  compare_torch = preset.compare_with_transformers and not args.no_transformers
  if compare_torch:
    presets.weights_dir(args.preset)  # build the shared weights once, before the workers start
  result = harness.compare(
      f"generate_{args.workload}", args.preset, ours="generation:setup_jax",
      theirs="generation:setup_torch" if compare_torch else None, reps=args.reps,
      warmup=args.warmup, options={"workload": args.workload, "attention": args.attention},
      work=None if args.workload == "sentence" else rows * preset.new_tokens,
      work_unit="new_tokens")
  harness.print_table(result)
  print("wrote", harness.write_json(result, args.out))


if __name__ == "__main__":
  main()
