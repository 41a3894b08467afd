"""A tiny random model on synthetic shapes data: smoke tests and CPU runs in seconds.

  python train.py --config configs/tiny_test.py:qwen2 --workdir /tmp/tiny

The argument picks the family: qwen2 (default), olmo (post-norm, qk-norm) or olmoe (MoE).
The tokenizer is the demo BPE tokenizer built in-process; its ids fit a 512-row vocabulary.
"""

from configs.base_train import base_config, parse_arg

FAMILIES = ("qwen2", "olmo", "olmoe")


def get_config(arg: str | None = None):
  args = parse_arg(arg, {"family": "qwen2"})
  if args["family"] not in FAMILIES:
    raise ValueError(f"tiny_test: family {args['family']!r} unknown; expected one of {FAMILIES}")
  c = base_config()
  c.model.name = f"tiny-{args['family']}"
  c.model.dtype = "float32"
  c.model.remat_policy = "none"
  c.model.llm.update(vocab_size=512, embedding_size=512)
  # The synthetic source kind and the demo tokenizer register themselves on import.
  c.plugins = ("molmo_jax.data.synthetic", "molmo_jax.data.demo_tokenizer")
  c.tokenizer_dir = "builtin:demo"
  c.seed = 0
  c.total_steps = 30
  c.optimizer.connector = dict(learning_rate=1e-3, warmup_steps=3)
  c.optimizer.vit = dict(learning_rate=1e-3, warmup_steps=3)
  c.optimizer.llm = dict(learning_rate=1e-3, warmup_steps=3)
  c.data.sources = {"shapes": dict(kind="synthetic", options=dict(num_examples=64, seed=0))}
  c.data.seq_len = 256
  c.data.global_batch_size = 8
  c.data.num_workers = 0
  c.mesh.update(dict(data=-1, fsdp=1))
  c.checkpoint.update(dict(save_every=10, keep=2, replica_parallel=False))
  c.log_every = 5
  c.tensorboard = False
  return c
