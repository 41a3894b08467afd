"""Stage 1: dense captioning pre-training on PixMo-Cap (the reference's launch_scripts/train_multitask_model.py and train_captioner.py, left column).

  python train.py --config configs/pretrain_captioner.py:molmo-7b-d --workdir /ckpt/cap-7b-d \
      --config.init_from=/ckpt/molmo-7b-d-initial \
      --config.data.sources.pixmo_cap.path=/data/pixmo_cap

`init_from` is the untrained model assembled from the pretrained CLIP and LLM by
`python -m convert.build_initial` (its tokenizer/ is used). The argument picks the model:
molmo-7b-d (default), molmo-72b, molmo-7b-o, molmoe-1b.

Recipe: connector lr 2e-4 / 200 warmup steps, ViT 6e-6 / 2000, LLM 2e-5 / 2000; cosine to 10%;
AdamW (0.9, 0.95), eps 1e-6, no weight decay; per-component clipping at 1.0; global batch 128 of
2304 tokens; 4 epochs (4 * ceil(712k / 128) steps); residual dropout 0, response-only residual
dropout 0.1; z-loss 1e-4; the pretrained token embeddings stay frozen.

Data: each PixMo-Cap record packs the long caption and one transcript as two conversations
about the image (the pipeline's subsegment packing), with the "long_caption" / "transcript"
styles and no User:/Assistant: roles (message_format "none").
"""

import math

from configs.base_train import base_config, parse_arg

MODELS = ("molmo-7b-d", "molmo-72b", "molmo-7b-o", "molmoe-1b")
PIXMO_CAP_IMAGES = 712_000       # images in the paper's PixMo-Cap train split (about)
GLOBAL_BATCH = 128


def get_config(arg: str | None = None):
  args = parse_arg(arg, {"model": "molmo-7b-d"})
  if args["model"] not in MODELS:
    raise ValueError(f"pretrain_captioner: model {args['model']!r} unknown; expected one of {MODELS}")
  c = base_config()
  c.model.name = args["model"]
  c.model.llm.update(residual_dropout=0.0, response_residual_dropout=0.1)
  c.total_steps = 4 * math.ceil(PIXMO_CAP_IMAGES / GLOBAL_BATCH)
  c.optimizer.connector = dict(learning_rate=2e-4, warmup_steps=200)
  c.optimizer.vit = dict(learning_rate=6e-6, warmup_steps=2000)
  c.optimizer.llm = dict(learning_rate=2e-5, warmup_steps=2000)
  c.data.global_batch_size = GLOBAL_BATCH
  c.data.seed = 95818
  c.data.sources = {
      "pixmo_cap": dict(kind="hf", path="data/pixmo_cap", message_format="none",
                        options=dict(split="train", messages_column="conversations",
                                     style_column="style")),
  }
  # The reference ran 4 rows per device and step (micro-batch); e.g. on 32 chips: 128 / (32*4) = 1.
  c.micro_batches = 1
  # Pure FSDP over the whole slice: compiled for v5p it fits where (fsdp, tensor=4) does not
  # (72B fine-tuning on 256 chips: 19.9 GiB vs 116.8 GiB per chip; docs/scaling.md).
  c.mesh.update(dict(fsdp=-1, tensor=1))
  if args["model"] == "molmoe-1b":
    c.mesh.update(dict(fsdp=-1, expert=4))
  c.checkpoint.save_every = 1000
  return c
