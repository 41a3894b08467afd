"""Stage 2: multitask fine-tuning on the "3.2-synthetic" mixture (the reference's launch_scripts/train_multitask_model.py and train_captioner.py, right column).

  python train.py --config configs/finetune_multitask.py:model=molmo-7b-d,data_root=/data \
      --workdir /ckpt/ft-7b-d \
      --config.init_from=/ckpt/cap-7b-d-final

`init_from` is a model directory with the captioning stage's weights (or a converted release).
The argument picks the model: molmo-7b-d (default), molmo-72b, molmo-7b-o, molmoe-1b.

Recipe: connector lr 5e-6, ViT 5e-6, LLM 1e-5, all with 200 warmup steps; cosine to 10%; AdamW
(0.9, 0.95), eps 1e-6; per-component clipping 1.0; global batch 256 of 2304 tokens; 30,000 steps;
residual dropout 0.1, response-only dropout 0; multi-annotation weighting sqrt(1/n) per packed
conversation; z-loss 1e-4; frozen pretrained token embeddings.

Mixture: groups demo 0.15 / aux 0.50 / pointing 0.35, inside a group rates proportional to
sqrt(size) with the size overrides of the reference (pixmo_cap 50,000, dv_qa and figure_qa
10,000, plot_qa 20,000). Every source is a local Hugging Face dataset under data_root/<name>
whose rows follow the record schema (molmo_jax/data/sources.py): a "conversations" column, and
"style" and "weight" columns where the reference uses them (chart_qa_weighted carries the
human/augmented weights 1.477 / 0.523).
"""

from configs.base_train import base_config, parse_arg

MODELS = ("molmo-7b-d", "molmo-72b", "molmo-7b-o", "molmoe-1b")

# (group, name, size used by the sqrt rule or None for the true size)
MIXTURE = (
    ("demo", "pixmo_ask_model_anything", None),
    ("demo", "pixmo_cap", 50_000),
    ("demo", "pixmo_cap_qa", None),
    ("demo", "pixmo_pointing_explanations", None),
    ("aux", "coco_2014_vqa_multi", None),
    ("aux", "text_vqa", None),
    ("aux", "okvqa", None),
    ("aux", "chart_qa_weighted", None),
    ("aux", "doc_qa", None),
    ("aux", "info_qa", None),
    ("aux", "ai2_diagram_v2_mix_transparent", None),
    ("aux", "a_okvqa_mc", None),
    ("aux", "a_okvqa_da", None),
    ("aux", "android_control", None),
    ("aux", "science_qa_img", None),
    ("aux", "tabwmp_da", None),
    ("aux", "st_qa", None),
    ("aux", "tally_qa", None),
    ("aux", "pixmo_docs_charts", None),
    ("aux", "pixmo_docs_tables", None),
    ("aux", "pixmo_docs_other", None),
    ("aux", "pixmo_docs_diagrams", None),
    ("aux", "dv_qa", 10_000),
    ("aux", "figure_qa", 10_000),
    ("aux", "plot_qa", 20_000),
    ("pointing", "pixmo_points", None),
    ("pointing", "pixmo_count", None),
    ("pointing", "pixmo_points_high_freq", None),
    ("pointing", "pixmo_points_counting", None),
    ("pointing", "pixmo_points_high_freq_counting", None),
    ("pointing", "pixmo_count_counting", None),
)
GROUP_RATES = {"demo": 0.15, "aux": 0.50, "pointing": 0.35}


def mixture_sources(data_root: str) -> dict:
  sources = {}
  for group, name, size in MIXTURE:
    options = dict(split="train", messages_column="conversations", style_column="style")
    if name == "chart_qa_weighted":
      options["weight_column"] = "weight"
    sources[name] = dict(kind="hf", path=f"{data_root}/{name}", group=group, size=size,
                         options=options)
  return sources


def get_config(arg: str | None = None):
  args = parse_arg(arg, {"model": "molmo-7b-d", "data_root": "data"})
  if args["model"] not in MODELS:
    raise ValueError(f"finetune_multitask: model {args['model']!r} unknown; expected one of {MODELS}")
  c = base_config()
  c.model.name = args["model"]
  c.model.llm.update(residual_dropout=0.1, response_residual_dropout=0.0)
  c.total_steps = 30_000
  c.optimizer.connector = dict(learning_rate=5e-6, warmup_steps=200)
  c.optimizer.vit = dict(learning_rate=5e-6, warmup_steps=200)
  c.optimizer.llm = dict(learning_rate=1e-5, warmup_steps=200)
  c.data.global_batch_size = 256
  c.data.seed = 50189
  c.data.group_rates = dict(GROUP_RATES)
  c.data.sources = mixture_sources(args["data_root"])
  # Pure FSDP over the whole slice: compiled for v5p it fits where (fsdp, tensor=4) does not
  # (72B fine-tuning on 256 chips: 19.9 GiB vs 116.8 GiB per chip; docs/scaling.md).
  c.mesh.update(dict(fsdp=-1, tensor=1))
  if args["model"] == "molmoe-1b":
    c.mesh.update(dict(fsdp=-1, expert=4))
  c.checkpoint.save_every = 1000
  return c
