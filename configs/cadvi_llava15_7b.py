"""CaD-VI's 7B recipe (Lin et al. 2024) on TPU pods / GPUs: CaD-LLaVA V1 and V2 from Vicuna-1.5
with the LLaVA-1.5 stage-1 projector, on LLaVA-665K + CaD-Inst.

    python -m lvlm_jax.train --config configs/cadvi_llava15_7b.py \
        --config.model.hf_dir=/path/to/vicuna-7b-v1.5-llava-pretrain-hf \
        --config.data.base_conversations="('/data/llava_v1_5_mix665k.json',)" \
        --config.data.phase1_data=/data/CaD-Inst/phase1_instruct_data_278k.json \
        --config.data.phase2_data=/data/CaD-Inst/phase2_instruct_data_71k.json \
        --config.data.image_roots="('/data/coco', '/data/ln_images', '/data/gqa')"

model.hf_dir: an HF LLaVA directory of Vicuna-7B-v1.5, CLIP ViT-L/14-336 and the LLaVA-1.5
stage-1 projector (llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5; transformers'
convert_llava_weights_to_hf.py builds one): CaD-VI replaces LLaVA-1.5's stage-2 tuning rather
than fine-tuning a finished LLaVA (METHODS.md 4.3). The data are the released files
(wlin21at/CaD-Inst; the Mixtral phase-1 generation was not released): phase1 = 665K + V1 (278K),
phase2 = 665K + 2 x V1 + V2 (71K), the recipe's file list. With data.phase2_pairs_file instead of
phase2_data, the phase-1 model re-annotates those pairs itself (phase 2 as the paper did it).
Values from scripts/v1_5/finetune_vicuna7b_lora.sh (METHODS.md 4.3); copy this file to change
the recipe.
"""

from lvlm_jax.methods import cadvi


def get_config():
  config = cadvi.default_config()

  config.model.hf_dir = "vicuna-7b-v1.5-llava-pretrain-hf"
  config.model.tokenizer = ""  # the one in hf_dir
  config.model.dtype = "bfloat16"  # bf16/tf32; master weights and Adam moments stay float32
  config.model.param_dtype = "float32"
  config.model.remat = "full"
  # LoRA r=128, alpha=256 on every LLM linear layer; the projector fully trained; vision frozen.
  config.model.use_lora = True
  config.model.lora.rank = 128
  config.model.lora.alpha = 256.0
  config.model.lora.dropout = 0.05
  config.model.lora.target = r"llm\.layers\.\d+\.(attn|mlp)\.\w+_proj"

  config.data.source = "files"
  config.data.base_tasks = ()
  config.data.base_conversations = ()  # llava_v1_5_mix665k.json
  config.data.phase1_data = ""  # phase1_instruct_data_278k.json
  config.data.phase2_data = ""  # phase2_instruct_data_71k.json
  config.data.pipeline.template = "vicuna_v1"  # conv_vicuna_v1
  config.data.pipeline.length_buckets = (512, 1024, 1536, 2048)  # model_max_length 2048
  config.data.pipeline.max_images = 2  # "Image 1: <image>\nImage 2: <image>\n{instruction}"
  config.data.pipeline.worker_count = 8
  config.data.pipeline.read_threads = 16

  config.cad.phase1_repeats = 2  # phase1_278k.json listed twice
  config.cad.epochs = 1.0
  config.cad.generation.max_new_tokens = 256  # greedy, as CaD-VI decodes
  config.cad.generation.batch_size = 64

  config.optim.trainable = r".*\.lora_[ab]|projector\..*"
  config.optim.lr = 1e-4
  config.optim.lr_groups = ((r"projector\..*", 2e-5),)  # mm_projector_lr
  config.optim.schedule = "cosine"
  config.optim.warmup_ratio = 0.03
  config.optim.weight_decay = 0.0
  config.optim.clip_norm = 1.0

  # 32 per device x 4 GPUs; loss_type clm (plain next-token cross-entropy).
  config.train.batch_size = 128
  config.train.logits_chunk = 512
  config.train.log_every = 10

  config.checkpoint.every_steps = 500
  config.checkpoint.keep = 2
  config.checkpoint.save_frozen = False
  config.checkpoint.export_dtype = "bfloat16"

  config.mesh.shape = (1, -1, 1)  # FSDP over every device

  # The shapes-world metrics mean nothing here; evaluate the exports on BISON, SVO-Probes,
  # NLVR2, EQBEN and COLA: python -m lvlm_jax.evaluate --model <stage>/export/hf
  # --benchmark bison --data BISON.jsonl --images <its folder>.
  config.eval.yes_no = 0
  config.eval.grounding = 0
  config.eval.captions = 0
  config.cad_eval.selection = 0
  config.cad_eval.summaries = 0
  return config
