"""The built-in demo: a tiny Molmo trained from scratch on synthetic shapes (2 CPU cores, ~15 min).

  python -m molmo_jax.demo --workdir outputs/demo            # what `make demo` runs
  python train.py --config configs/demo.py --workdir /tmp/demo-train   # training only

Same architecture family as Molmo-7B-D (CLIP-style ViT -> 2x2 attention-meanq pooling -> SwiGLU
projector -> pre-norm Qwen2-style decoder with GQA and qkv bias), shrunk to what 2 CPU cores
train in about 13 minutes (1600 steps of 16 examples at ~0.3-0.5 s/step): 64 px crops of 8 px
patches with the released overlap-and-resize logic, one high-res crop plus the global view, a
3-block ViT of width 128 and a 3-layer decoder of width 192. Scenes are 64 px squares with 0-3
circles/squares in red/green/blue, each 30-42 % of the side; half the questions ask to count a
kind, half to point at it. The tokenizer is the demo BPE tokenizer built in-process (441
entries; ids fit vocab 448). Examples longer than 112 tokens (a few 3-object answers) are dropped.

What makes it point (docs/demo.md has the experiments): the ViT's positional table starts as 2-D
sin/cos and stays frozen, and the vision side learns slowly (ViT 5e-4, connector 2e-4), so the
image features keep where each cell is; the decoder learns at 6e-4 (2e-3 kept it on the
"stock coordinates" plateau longer); objects of 30-42 % of the side give the decoder a larger
target to find.

Argument (optional): "steps=N,batch=B" to shorten or lengthen the run.
"""

from configs.base_train import base_config, parse_arg

DEMO_MODEL = dict(
    vision=dict(image_size=64, patch_size=8, width=128, num_heads=4, head_dim=32, num_layers=3,
                mlp_dim=384, selected_layers=(-1, -2), position_init="sincos2d"),
    connector=dict(pool_heads=4, pool_head_dim=32, projector_hidden=384),
    llm=dict(num_layers=3, d_model=192, num_heads=4, num_kv_heads=2, head_dim=48, mlp_dim=512,
             qkv_bias=True, norm_eps=1e-6, rope_theta=10000.0, rope_max_length=1024, vocab_size=448,
             embedding_size=448, additional_vocab_size=32),
    preprocess=dict(crop_size=64, patch_size=8, pool_size=2, overlap_margins=(2, 2), max_crops=1),
)

# Scenes: 64 px squares, 0-3 objects of 30-42 % of the side; counting and pointing questions.
DEMO_SCENES = dict(min_side=64, max_side=64, max_objects=3, shapes=("circle", "square"),
                   colours=("red", "green", "blue"), min_size_fraction=0.3, max_size_fraction=0.42,
                   task_weights=(0.5, 0.5, 0.0))
# Per-component peak learning rates (warmup, then cosine to 10 %).
DEMO_LEARNING_RATES = dict(connector=2e-4, vit=5e-4, llm=6e-4)


def get_config(arg: str | None = None):
  args = parse_arg(arg, {"steps": "1600", "batch": "16"})
  c = base_config()
  c.model.name = "tiny-qwen2"
  c.model.dtype = "float32"
  c.model.remat_policy = "none"
  # CPU: unrolled layer loops (3 ViT blocks, 3 decoder layers) skip the scans' stacked buffers.
  c.model.scan_unroll = 3
  for section in ("vision", "connector", "llm", "preprocess"):
    c.model[section].update(DEMO_MODEL[section])
  # The synthetic source kind and the demo tokenizer register themselves on import.
  c.plugins = ("molmo_jax.data.synthetic", "molmo_jax.data.demo_tokenizer")
  c.tokenizer_dir = "builtin:demo"
  c.seed = 0
  c.total_steps = int(args["steps"])
  c.z_loss_weight = 0.0
  warmup = max(1, min(100, c.total_steps // 10))
  for component, lr in DEMO_LEARNING_RATES.items():
    c.optimizer[component] = dict(learning_rate=lr, warmup_steps=warmup)
  c.optimizer.max_grad_norm = 1.0
  # Trained from scratch: the token table has no pretrained rows to protect. The 2-D sin/cos
  # positional table stays as initialised, so every patch keeps saying where it is.
  c.optimizer.frozen_patterns = (r"^vision/positional_embedding$",)
  c.data.sources = {"shapes": dict(kind="synthetic", options=dict(
      num_examples=200_000, seed=0, split="train", task="mixed", config=dict(DEMO_SCENES)))}
  c.data.seq_len = 112
  c.data.global_batch_size = int(args["batch"])
  c.data.num_workers = 0
  c.data.on_overflow = "drop"
  c.mesh.update(dict(data=-1, fsdp=1))
  c.checkpoint.update(dict(save_every=500, keep=1, async_save=True))
  c.log_every = 50
  c.tensorboard = True
  return c
