"""Fine-tune a converted Molmo on your own JSONL data (format: docs/data.md).

  python train.py --config configs/finetune_custom.py:model=/ckpt/molmo-7b-d,data=/data/train.jsonl \
      --workdir /ckpt/my-run [--config.total_steps=2000 --config.data.global_batch_size=64 ...]

`model` is a model directory written by the converter (params/, config.json, tokenizer/); the
architecture comes from its config.json and its weights start the run (params only; the
optimizer starts fresh). A restart with the same workdir resumes from the latest checkpoint.

Defaults follow the multitask fine-tuning recipe (LRs 5e-6 / 5e-6 / 1e-5, cosine to 10%, AdamW
(0.9, 0.95), clipping 1.0 per component, residual dropout 0.1) with a short warmup and a small
batch; scale total_steps and the batch to your data. To train only part of the model, set a
component's learning_rate to 0.
"""

from configs.base_train import base_config, parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, {"model": "", "data": ""})
  c = base_config()
  c.model.name = ""                       # the architecture comes from init_from's config.json
  c.model.llm.update(residual_dropout=0.1, response_residual_dropout=0.0)
  c.init_from = args["model"]
  c.total_steps = 1000
  c.optimizer.connector = dict(learning_rate=5e-6, warmup_steps=50)
  c.optimizer.vit = dict(learning_rate=5e-6, warmup_steps=50)
  c.optimizer.llm = dict(learning_rate=1e-5, warmup_steps=50)
  c.data.global_batch_size = 32
  c.data.sources = {"custom": dict(kind="jsonl", path=args["data"])}
  c.data.num_workers = 4
  c.checkpoint.save_every = 200
  c.log_every = 10
  return c
