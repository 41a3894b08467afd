"""Sequence packing across examples (data/packing.py) and the block-diagonal attention it needs.

Legend: S seq_len, M crop slots, P patches per crop, C patch values, Q pooled cells per crop,
V vocabulary.

A packed row must give every example exactly what it gets alone: the same per-example loss
(1e-5), no attention across examples (mask check, and perturbing one example leaves the others'
logits unchanged), image features landing on the example's own tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molmo_jax import config as C
from molmo_jax.data import packing
from molmo_jax.models.molmo import Molmo, text_attention_mask
from molmo_jax.preprocess.examples import collate
from molmo_jax.training import loss as loss_lib
from model_helpers import random_params

S, M = 160, 4


def make_example(cfg, length, crops, seed):
  rng = np.random.default_rng(seed)
  p, c, q = cfg.vision.num_patches, cfg.vision.patch_dim, cfg.preprocess.pooled_per_crop
  idx = np.full((crops, q), -1, np.int32)
  for k in range(crops):                    # crop k's features land on tokens 1 + kQ .. (k+1)Q
    idx[k] = 1 + k * q + np.arange(q)
  assert crops * q < length
  return {"input_ids": rng.integers(0, cfg.llm.vocab_size, length).astype(np.int32),
          "target_ids": rng.integers(0, cfg.llm.vocab_size, length).astype(np.int32),
          "loss_weights": np.where(np.arange(length) > crops * q, rng.uniform(0.5, 2.0, length), 0
                                   ).astype(np.float32),
          "subsegment_ids": np.zeros(length, np.int32),
          "position_ids": np.arange(length, dtype=np.int32),
          "images": rng.standard_normal((crops, p, c)).astype(np.float32),
          "image_masks": np.ones((crops, p), np.float32),
          "image_input_idx": idx}


@pytest.fixture(scope="module")
def setup():
  cfg = C.tiny("qwen2")
  q = cfg.preprocess.pooled_per_crop
  examples = [make_example(cfg, 20 + q, 1, 0), make_example(cfg, 30 + 2 * q, 2, 1),
              make_example(cfg, 12 + q, 1, 2)]
  model = Molmo(cfg)
  row = packing.pack_row(examples, S, M)
  batch = {k: jnp.asarray(v[None]) for k, v in row.items()}
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
  params = random_params(abstract["params"], seed=3)
  forward = jax.jit(lambda b: model.apply({"params": params}, b)[0])
  return cfg, examples, row, forward


def per_example_loss(logits, batch, keep):
  weights = jnp.where(keep, batch["loss_weights"], 0.0)
  sums = loss_lib.loss_sums(logits, batch["target_ids"], weights)
  return float(loss_lib.loss_from_sums(sums)[0])


def test_pack_row_layout(setup):
  cfg, examples, row, _ = setup
  q = cfg.preprocess.pooled_per_crop
  lengths = [len(ex["input_ids"]) for ex in examples]
  starts = np.cumsum([0] + lengths)
  assert row["input_ids"].shape == (S,) and row["images"].shape[0] == M
  np.testing.assert_array_equal(row["segment_ids"][:starts[-1]],
                                np.repeat(np.arange(3), lengths))
  assert (row["segment_ids"][starts[-1]:] == -1).all() and (row["input_ids"][starts[-1]:] == -1).all()
  for i, ex in enumerate(examples):                        # positions restart, weights unchanged
    np.testing.assert_array_equal(row["position_ids"][starts[i]:starts[i + 1]], np.arange(lengths[i]))
    np.testing.assert_array_equal(row["loss_weights"][starts[i]:starts[i + 1]], ex["loss_weights"])
  # Crops one after another; example 1's image indices shifted by its first token's offset.
  np.testing.assert_array_equal(row["images"][1:3], examples[1]["images"])
  np.testing.assert_array_equal(row["image_input_idx"][1], examples[1]["image_input_idx"][0] + starts[1])
  np.testing.assert_array_equal(row["image_input_idx"][3], examples[2]["image_input_idx"][0] + starts[2])
  assert q > 0
  # A padded single-example row strips back to the example.
  padded = {k: v[0] for k, v in collate([examples[1]], S, M - 1).items()}
  stripped = packing.strip_padding(padded)
  for key, value in examples[1].items():
    np.testing.assert_array_equal(stripped[key], value)
  with pytest.raises(ValueError, match="do not fit"):
    packing.pack_row(examples * 3, S, M)


def test_attention_mask_is_block_diagonal(setup):
  _, _, row, _ = setup
  mask = np.asarray(text_attention_mask(jnp.asarray(row["input_ids"][None]),
                                        jnp.asarray(row["subsegment_ids"][None]),
                                        jnp.asarray(row["segment_ids"][None])))[0]
  seg = row["segment_ids"]
  assert not mask[seg[:, None] != seg[None, :]].any()
  # Within an example it is the plain causal mask.
  first = np.flatnonzero(seg == 1)
  block = mask[np.ix_(first, first)]
  np.testing.assert_array_equal(block, np.tril(np.ones_like(block)))


def test_packed_row_gives_each_example_its_own_loss(setup):
  cfg, examples, row, forward = setup
  batch = {k: jnp.asarray(v[None]) for k, v in row.items()}
  packed_logits = forward(batch)
  for i, ex in enumerate(examples):
    alone = {k: jnp.asarray(v) for k, v in collate([ex], S, M - 1).items()}
    alone_logits = forward(alone)
    want = per_example_loss(alone_logits, alone, jnp.ones((1, S), bool))
    got = per_example_loss(packed_logits, batch, batch["segment_ids"] == i)
    assert abs(got - want) <= 1e-5, (i, got, want)
    assert want > 0.5
    # Token by token too.
    n = len(ex["input_ids"])
    start = int(np.flatnonzero(row["segment_ids"] == i)[0])
    np.testing.assert_allclose(np.asarray(packed_logits[0, start:start + n]),
                               np.asarray(alone_logits[0, :n]), atol=1e-5, rtol=0)


def test_perturbing_one_example_leaves_the_others_unchanged(setup):
  cfg, examples, row, forward = setup
  logits = np.asarray(forward({k: jnp.asarray(v[None]) for k, v in row.items()}))
  changed = dict(row)
  seg0 = row["segment_ids"] == 0
  changed["input_ids"] = np.where(seg0, (row["input_ids"] + 5) % cfg.llm.vocab_size, row["input_ids"])
  changed["images"] = row["images"].copy()
  changed["images"][0] += 1.0                               # example 0's crop
  new = np.asarray(forward({k: jnp.asarray(v[None]) for k, v in changed.items()}))
  others = row["segment_ids"] >= 1
  assert np.abs(new[0, seg0] - logits[0, seg0]).max() > 1e-2       # example 0 did change
  np.testing.assert_allclose(new[0, others], logits[0, others], atol=1e-6, rtol=0)


def test_row_packer_best_fit_and_fullest_out():
  rng = np.random.default_rng(0)
  ex = lambda n: {"input_ids": rng.integers(0, 50, n).astype(np.int32),
                  "target_ids": np.zeros(n, np.int32), "loss_weights": np.ones(n, np.float32),
                  "subsegment_ids": np.zeros(n, np.int32), "position_ids": np.arange(n, dtype=np.int32)}
  packer = packing.RowPacker(seq_len=10, crop_slots=0, num_bins=2)
  assert packer.add(ex(6), "a") == []
  assert packer.add(ex(7), "b") == []                      # does not fit with a: second row
  closed = packer.add(ex(3), "c")                          # best fit: fills b exactly -> emitted
  assert [tags for _, tags in closed] == [["b", "c"]] and packer.open_tags() == [["a"]]
  assert packer.add(ex(3), "d") == [] and packer.open_tags() == [["a", "d"]]
  assert packer.add(ex(8), "e") == []
  closed = packer.add(ex(9), "f")                          # no room, 2 rows open: fullest out
  assert [tags for _, tags in closed] == [["a", "d"]]
  assert packer.open_tags() == [["e"], ["f"]]
  assert [tags for _, tags in packer.add(ex(2), "g", alone=True)] == [["g"]]
  rows = [r for r, _ in packer.flush()]
  assert packer.open_tags() == [] and len(rows) == 2
  with pytest.raises(ValueError, match="do not fit"):
    packer.add(ex(11), "h")
  assert 0 < packing.non_padding_fraction(rows) <= 1


# ----------------------------------------------------------------------------------------------
# The training pipeline with pack_examples
# ----------------------------------------------------------------------------------------------

def _pipeline_setup():
  from molmo_jax.data import demo_tokenizer
  from molmo_jax.data import pipeline as P
  from molmo_jax.data.sources import SourceConfig
  from molmo_jax.preprocess.tokens import MolmoTokenizer
  vocab = demo_tokenizer.DEMO_VOCAB_SIZE
  model = C.tiny("qwen2", vocab_size=vocab, embedding_size=vocab)
  tok = MolmoTokenizer(demo_tokenizer.build_demo_tokenizer(), vocab_size=vocab)
  shapes = SourceConfig("shapes", "synthetic", options=dict(num_examples=40, seed=0, task="mixed"),
                        rate=0.75)
  alone = SourceConfig("alone", "synthetic", options=dict(num_examples=40, seed=1, task="mixed"),
                       pack=False, rate=0.25)
  make = lambda **kw: P.DataConfig(sources=(shapes, alone), seq_len=512, global_batch_size=2,
                                   seed=5, **kw)
  return P, model, tok, make


def test_pipeline_packs_examples_and_resumes_exactly():
  P, model, tok, make = _pipeline_setup()
  slots = 3 * (model.preprocess.max_crops + 1)
  packed_cfg = make(pack_examples=True, pack_crop_slots=slots, pack_bins=4)
  packed = P.make_train_iterator(packed_cfg, model, tok)
  batches, positions = [], []
  for _ in range(5):
    batches.append(next(packed))
    positions.append(packed.last_positions)
  state = packed.get_state()
  assert state["open_rows"]                                  # examples waiting in open rows
  batches += [next(packed) for _ in range(2)]
  assert batches[0]["images"].shape[1] == slots and "segment_ids" in batches[0]
  plain = P.make_train_iterator(make(), model, tok)
  by_position = {}
  for _ in range(20):
    b = next(plain)
    for r, pos in enumerate(plain.last_positions):
      by_position[int(pos)] = {k: v[r] for k, v in b.items()}
  # The reported fraction is that of the batches returned.
  assert packed.non_padding_fraction == pytest.approx(packing.non_padding_fraction(
      {"input_ids": np.concatenate([b["input_ids"] for b in batches])}))
  # Every example of a packed row is the unpacked pipeline's example of that stream position,
  # with its own positions and crops; the source with pack=False always has a row of its own.
  per_row = []
  for batch, tags in zip(batches[:5], positions):
    seen = 0
    for r in range(batch["input_ids"].shape[0]):
      segments = int(batch["segment_ids"][r].max()) + 1
      per_row.append(segments)
      crop = 0
      for seg in range(segments):
        keep = batch["segment_ids"][r] == seg
        want = by_position[int(tags[seen])]
        n = int(keep.sum())
        for key in ("input_ids", "target_ids", "loss_weights", "position_ids", "subsegment_ids"):
          np.testing.assert_array_equal(batch[key][r][keep], want[key][:n], err_msg=key)
        crops = int((want["images"] != -1).any(axis=(1, 2)).sum())
        np.testing.assert_array_equal(batch["images"][r][crop:crop + crops], want["images"][:crops])
        crop += crops
        source, _, _ = packed.plan.locate(int(tags[seen]))
        if source == 1:
          assert segments == 1
        seen += 1
    assert seen == len(tags)
  assert max(per_row) >= 3 and min(per_row) == 1
  # Resume: a fresh iterator set to the state continues with the same batches.
  again = P.make_train_iterator(packed_cfg, model, tok)
  again.set_state(state)
  for want in batches[5:]:
    got = next(again)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
