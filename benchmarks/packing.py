"""How much of a fine-tuning batch is padding, with and without packing examples into rows.

Run:  python benchmarks/packing.py [--examples 600] [--seq-len 2304] [--out PATH]
      (default PATH: benchmarks/results/packing.json)

Writes a JSONL manifest of text-only examples whose token lengths are spread uniformly between
100 and seq_len (2304) tokens, reads it with the training pipeline (demo tokenizer, the tiny
model's geometry) once with one example per row and once with `pack_examples` (best fit over
`pack_bins` open rows), and prints the non-padding fraction of the token slots of each, as the
pipeline reports it. Needs no network and no accelerator.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from molmo_jax import config as C  # noqa: E402
from molmo_jax.data import demo_tokenizer  # noqa: E402
from molmo_jax.data import pipeline as P  # noqa: E402
from molmo_jax.data.sources import SourceConfig  # noqa: E402
from molmo_jax.preprocess.tokens import MolmoTokenizer  # noqa: E402

WORDS = ("red blue green square circle triangle small large left right top bottom the a of and "
         "near far above below between two three four five shape colour").split()


def write_manifest(path: Path, n: int, seq_len: int, tok: MolmoTokenizer, seed: int = 0) -> list[int]:
  """n records with a question and an answer of random words, sized so that the whole example
  (prompt template included) has a length drawn uniformly from [100, seq_len]."""
  rng = np.random.default_rng(seed)
  probe = " ".join(rng.choice(WORDS, 400))
  per_word = len(tok.encode(probe)) / 400
  targets = rng.integers(100, seq_len + 1, n)
  with path.open("w") as f:
    for target in targets:
      words = max(1, int((target - 20) / per_word))
      answer = " ".join(rng.choice(WORDS, words))
      f.write(json.dumps({"image": None, "messages": ["Describe the shapes.", answer]}) + "\n")
  return [int(t) for t in targets]


def run(path: Path, model, tok, seq_len: int, batch: int, batches: int, **packing) -> dict:
  cfg = P.DataConfig(sources=(SourceConfig("spread", "jsonl", path=str(path)),), seq_len=seq_len,
                     global_batch_size=batch, seed=0, on_overflow="drop", **packing)
  iterator = P.make_train_iterator(cfg, model, tok)
  lengths = []
  for _ in range(batches):
    b = next(iterator)
    if not packing:
      lengths += list((b["input_ids"] != -1).sum(axis=1))
  iterator.close()
  return {"non_padding_fraction": iterator.non_padding_fraction,
          "examples_per_row": iterator.examples_per_row,
          "rows": batches * batch, **({"example_lengths": lengths} if lengths else {})}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--examples", type=int, default=600)
  p.add_argument("--seq-len", type=int, default=2304)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--bins", type=int, default=16)
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "packing.json"))
  args = p.parse_args()
  vocab = demo_tokenizer.DEMO_VOCAB_SIZE
  model = C.tiny("qwen2", vocab_size=vocab, embedding_size=vocab)
  tok = MolmoTokenizer(demo_tokenizer.build_demo_tokenizer(), vocab_size=vocab)
  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "spread.jsonl"
    write_manifest(path, args.examples, args.seq_len, tok)
    plain = run(path, model, tok, args.seq_len, args.batch, args.batches)
    packed = run(path, model, tok, args.seq_len, args.batch, args.batches, pack_examples=True,
                 pack_bins=args.bins)
  lengths = np.asarray(plain.pop("example_lengths"))
  print(f"{args.examples} text-only examples, lengths {lengths.min()}..{lengths.max()} tokens "
        f"(mean {lengths.mean():.0f}), seq_len {args.seq_len}, {args.batches} batches of {args.batch}")
  print("| pipeline | non-padding tokens | examples per row |")
  print("|---|---|---|")
  print(f"| one example per row | {100 * plain['non_padding_fraction']:.1f} % | "
        f"{plain['examples_per_row']:.2f} |")
  print(f"| packed (best fit, {args.bins} open rows) | {100 * packed['non_padding_fraction']:.1f} % | "
        f"{packed['examples_per_row']:.2f} |")
  out = {"seq_len": args.seq_len, "examples": args.examples, "batch": args.batch,
         "batches": args.batches, "bins": args.bins,
         "lengths": {"min": int(lengths.min()), "max": int(lengths.max()), "mean": float(lengths.mean())},
         "unpacked": plain, "packed": packed}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
