"""Data sources and the grain input pipeline (molmo_jax.data; the reference's olmo/data/collator.py; olmo/data/model_preprocessor.py (several conversations per image))."""

import json
import math
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from molmo_jax import config as C
from molmo_jax.data import demo_tokenizer, mixture, synthetic
from molmo_jax.data import pipeline as P
from molmo_jax.data.sources import HFSource, JsonlSource, RecordError, SourceConfig, open_source
from molmo_jax.data.synthetic import SyntheticRecords
from molmo_jax.preprocess import points as points_lib
from molmo_jax.preprocess.examples import ATTEND_ALL_SUBSEGMENT
from molmo_jax.preprocess.tokens import MolmoTokenizer

VOCAB = demo_tokenizer.DEMO_VOCAB_SIZE
MODEL = C.tiny("qwen2", vocab_size=VOCAB, embedding_size=VOCAB)   # 32 px crops, max_crops 4
PRE = MODEL.preprocess
SLOTS, PATCHES, PATCH_DIM = PRE.max_crops + 1, PRE.crop_patches ** 2, PRE.patch_size ** 2 * 3
POOLED = PRE.pooled_per_crop


@pytest.fixture(scope="module")
def tok():
  return MolmoTokenizer(demo_tokenizer.build_demo_tokenizer(), vocab_size=VOCAB)


def synthetic_source(name, num, seed=0, task="mixed", **kw):
  return SourceConfig(name, "synthetic", options=dict(num_examples=num, seed=seed, task=task), **kw)


def data_config(*sources, **kw):
  kw = {"seq_len": 192, "global_batch_size": 4, "seed": 5, **kw}
  return P.DataConfig(sources=tuple(sources), **kw)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key


def write_png(path, width, height, seed=0):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return pixels


# ----------------------------------------------------------------------------- JSONL


@pytest.fixture()
def manifest(tmp_path):
  os.makedirs(tmp_path / "img")
  write_png(tmp_path / "img" / "a.png", 48, 40, seed=1)
  write_png(tmp_path / "img" / "b.png", 70, 30, seed=2)
  lines = [
      {"id": "qa", "image": "img/a.png", "style": "vqa2",
       "messages": [{"role": "user", "content": "What is red?"},
                    {"role": "assistant", "content": "a red circle"}]},
      {"id": "packed", "image": "img/b.png", "weight": 2.0,
       "conversations": [["Describe this image.", "two blue squares"], ["Count.", "two"]]},
      {"id": "point", "image": "img/b.png", "question": "Point to the cats.", "task": "pointing",
       "label": "cats", "points": [[7, 3], [35.5, 15]]},
      {"id": "count", "image": "img/a.png", "question": "How many dogs?", "task": "counting",
       "label": "dogs", "points": [[50, 25]], "point_units": "percent"},
      {"id": "text", "image": None, "question": "Say hi.", "answer": "hi"},
  ]
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
  return path


def test_jsonl_records_follow_the_schema(manifest, tmp_path):
  source = JsonlSource(manifest)
  assert len(source) == 5
  qa, packed, point, count, text = (source[i] for i in range(5))
  assert qa["image"] == os.path.join(tmp_path, "img", "a.png") and qa["style"] == "vqa2"
  assert qa["conversations"] == [["What is red?", "a red circle"]] and qa["id"] == "qa"
  assert packed["conversations"] == [["Describe this image.", "two blue squares"],
                                     ["Count.", "two"]]
  assert packed["weight"] == 2.0
  # Pixel points: the answer is written relative to the decoded image's (w, h) = (70, 30).
  expected = points_lib.format_points(np.array([[7, 3], [35.5, 15]]), (70, 30), "cats")
  assert point["conversations"] == [["Point to the cats.", expected]]
  assert expected.startswith('<points x1="10.0" y1="10.0" x2="50.7" y2="50.0"')
  assert point["style"] == "pointing" and isinstance(point["image"], str)   # decoded later
  assert count["conversations"][0][1] == points_lib.format_count_answer(
      np.array([[50, 25]]), (100, 100), "dogs")
  assert count["style"] == "point_count" and isinstance(count["image"], str)
  assert text["image"] is None and text["conversations"] == [["Say hi.", "hi"]]


def test_jsonl_pixel_points_outside_the_image_name_the_line(tmp_path):
  write_png(tmp_path / "a.png", 20, 10)
  line = {"image": "a.png", "question": "Point.", "task": "pointing", "label": "x",
          "points": [[5, 5], [25, 5]]}
  path = tmp_path / "pts.jsonl"
  path.write_text(json.dumps({"image": "a.png", "messages": ["q", "a"]}) + "\n" + json.dumps(line))
  source = JsonlSource(path)
  with pytest.raises(RecordError, match=f"{path}:2: field points: .* inside the 20x10 image"):
    source[1]


def test_jsonl_round_trip_through_the_pipeline(manifest, tok):
  cfg = data_config(SourceConfig("custom", "jsonl", str(manifest)), global_batch_size=5,
                    seq_len=256, on_overflow="error")
  batches = list(P.make_eval_batches(cfg, MODEL, tok, for_training=True))
  assert len(batches) == 1
  batch = batches[0]
  assert batch["valid"].all() and batch["record_index"].tolist() == [0, 1, 2, 3, 4]
  # Every answer comes back out of the target tokens.
  answers = [tok.decode(t[w > 0]) for t, w in zip(batch["target_ids"], batch["loss_weights"])]
  source = JsonlSource(manifest)
  for k, answer in enumerate(answers):
    for turns in source[k]["conversations"]:
      assert turns[1] in answer
  assert "vqa2: What is red?" in tok.decode(batch["input_ids"][0])
  # Packed record: two conversations after the shared image block, weights 2 * sqrt(1/2).
  seg = batch["subsegment_ids"][1]
  assert set(seg[seg >= 0].tolist()) == {1, 2, ATTEND_ALL_SUBSEGMENT}
  np.testing.assert_allclose(batch["loss_weights"][1][batch["loss_weights"][1] > 0],
                             2 * math.sqrt(0.5), rtol=1e-6)
  # Text-only record: no crops, every image slot absent.
  assert (batch["images"][4] == -1).all() and (batch["image_input_idx"][4] == -1).all()
  assert (batch["images"][0, 0] != -1).any()


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ('{"image": null}', "exactly one of 'messages'"),
    ('{"image": null, "messages": [{"role": "assistant", "content": "x"}]}', "messages[0].role"),
    ('{"image": null, "messages": ["q"]}', "field messages"),
    ('{"image": "missing.png", "messages": ["q", "a"]}', "field image"),
    ('{"image": null, "messages": ["q", "a"], "weight": -1}', ".weight"),
    ('{"image": null, "messages": ["q", 3]}', "messages[1]"),
    ('{"image": "ok.png", "question": "Point.", "task": "pointing", "points": [[1, 2]]}',
     "field label"),
    ('{"image": "ok.png", "question": "Point.", "task": "pose", "label": "x", "points": []}',
     "field task"),
    ('{"image": null, "conversations": [["q", "a"], []]}', "conversations[1]"),
]


@pytest.mark.parametrize("bad_line, field", BAD_LINES)
def test_bad_jsonl_line_names_file_line_and_field(tmp_path, bad_line, field):
  write_png(tmp_path / "ok.png", 8, 8)
  good = json.dumps({"image": "ok.png", "messages": ["q", "a"]})
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join([good, good, bad_line, good]) + "\n")
  with pytest.raises(RecordError) as info:
    JsonlSource(path)
  assert f"{path}:3" in str(info.value) and field in str(info.value)


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_parquet_and_save_to_disk_sources(tmp_path, tok):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  write_png(tmp_path / "c.png", 40, 20, seed=3)
  encoded = (tmp_path / "c.png").read_bytes()
  table = pa.table({
      "image": [{"bytes": encoded, "path": None}, {"bytes": None, "path": "c.png"}],
      "question": ["What color?", "Is it big?"],
      "answers": [["red", "dark red"], ["no"]],
      "kind": ["vqa2", None],
  })
  pq.write_table(table, tmp_path / "train.parquet")
  source = HFSource(tmp_path / "train.parquet", answer_column="answers", style_column="kind")
  assert len(source) == 2
  first, second = source[0], source[1]
  assert first["image"] == encoded and first["conversations"] == [["What color?", "red"]]
  assert first["answers"] == ["red", "dark red"] and first["style"] == "vqa2"
  assert second["image"] == os.path.join(tmp_path, "c.png") and second["style"] is None

  # save_to_disk layout: arrow stream files listed in state.json; a messages column.
  disk = tmp_path / "saved"
  disk.mkdir()
  messages = pa.table({"img": ["../c.png"], "chat": [[
      {"role": "user", "content": "Describe."}, {"role": "assistant", "content": "noise"}]]})
  with pa.ipc.new_stream(str(disk / "data-00000-of-00001.arrow"), messages.schema) as writer:
    writer.write_table(messages)
  (disk / "state.json").write_text(json.dumps({"_data_files": [
      {"filename": "data-00000-of-00001.arrow"}]}))
  saved = HFSource(disk, image_column="img", messages_column="chat")
  assert saved[0]["conversations"] == [["Describe.", "noise"]]
  with pytest.raises(ValueError, match="column\\(s\\) \\['nope'\\] not found"):
    HFSource(disk, image_column="nope", messages_column="chat")

  cfg = data_config(SourceConfig("pq", "hf", str(tmp_path / "train.parquet"),
                                 options={"answer_column": "answers"}),
                    SourceConfig("disk", "hf", str(disk),
                                 options={"image_column": "img", "messages_column": "chat"}),
                    global_batch_size=2)
  batch = next(P.make_train_iterator(cfg, MODEL, tok))
  assert batch["input_ids"].shape == (2, 192) and (batch["images"][:, 0] != -1).all()


# ----------------------------------------------------------------------------- mixture


def test_mixture_rates_follow_the_sqrt_rule_and_group_rates():
  a, b, c = SourceConfig("a", "jsonl", "x"), SourceConfig("b", "jsonl", "x"), SourceConfig(
      "c", "jsonl", "x", size=900)
  np.testing.assert_allclose(mixture.mixture_rates([a, b], [100, 400]), [1 / 3, 2 / 3])
  # size overrides the true length (pixmo_cap "counted as 50,000").
  np.testing.assert_allclose(mixture.mixture_rates([a, c], [100, 1_000_000]), [10 / 40, 30 / 40])
  explicit = [SourceConfig("a", "jsonl", "x", rate=3), SourceConfig("b", "jsonl", "x", rate=1)]
  np.testing.assert_allclose(mixture.mixture_rates(explicit, [5, 5000]), [0.75, 0.25])
  grouped = [SourceConfig("a", "jsonl", "x", group="demo"),
             SourceConfig("b", "jsonl", "x", group="demo"),
             SourceConfig("c", "jsonl", "x", group="aux")]
  rates = mixture.mixture_rates(grouped, [100, 400, 7], {"demo": 0.2, "aux": 0.6})
  np.testing.assert_allclose(rates, [0.25 / 3, 0.5 / 3, 0.75])
  with pytest.raises(ValueError, match="have no rate"):
    mixture.mixture_rates([explicit[0], b], [1, 1])
  with pytest.raises(ValueError, match="no group in group_rates"):
    mixture.mixture_rates(grouped, [1, 1, 1], {"demo": 1.0})


def test_mixture_draws_match_rates_and_reshuffle_each_epoch():
  rates = np.array([0.5, 0.3, 0.2])
  sizes = [40, 25, 7]
  plan = mixture.MixturePlan(sizes, rates, seed=11, shuffle=True, block=512)
  located = [plan.locate(k) for k in range(2000)]
  drawn = np.bincount([s for s, _, _ in located], minlength=3) / 2000
  tolerance = 4 * np.sqrt(rates * (1 - rates) / 2000)
  assert (np.abs(drawn - rates) < tolerance).all(), drawn
  for source, size in enumerate(sizes):
    records = [(r, e) for s, r, e in located if s == source]
    epochs = [[r for r, e in records if e == epoch] for epoch in range(3)]
    for epoch in epochs:
      assert sorted(epoch) == list(range(size))     # every record once per epoch
    assert epochs[0] != epochs[1]                    # a new permutation each epoch
  # Random access far ahead agrees with sequential access; a new plan gives the same answers.
  assert mixture.MixturePlan(sizes, rates, 11, True, block=512).locate(1999) == located[1999]
  ordered = mixture.MixturePlan(sizes, rates, 11, shuffle=False, block=512)
  assert [r for s, r, _ in (ordered.locate(k) for k in range(400)) if s == 2][:9] == [
      0, 1, 2, 3, 4, 5, 6, 0, 1]


# ----------------------------------------------------------------------------- training iterator


def test_batches_have_fixed_shapes_dtypes_and_padding(tok):
  cfg = data_config(synthetic_source("a", 40, seed=1), synthetic_source("b", 20, seed=2),
                    global_batch_size=3)
  iterator = P.make_train_iterator(cfg, MODEL, tok)
  expected = {"input_ids": ((3, 192), np.int32), "target_ids": ((3, 192), np.int32),
              "loss_weights": ((3, 192), np.float32), "subsegment_ids": ((3, 192), np.int32),
              "position_ids": ((3, 192), np.int32),
              "images": ((3, SLOTS, PATCHES, PATCH_DIM), np.float32),
              "image_masks": ((3, SLOTS, PATCHES), np.float32),
              "image_input_idx": ((3, SLOTS, POOLED), np.int32)}
  for batch in take(iterator, 4):
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    for ids, weights in zip(batch["input_ids"], batch["loss_weights"]):
      length = int((ids >= 0).sum())
      assert (ids[:length] >= 0).all() and (ids[length:] == -1).all()
      assert (weights[length:] == 0).all() and weights.sum() > 0
    used = batch["image_input_idx"][batch["image_input_idx"] >= 0]
    assert (batch["input_ids"].max() < VOCAB + 5) and used.size > 0


def test_overflowing_examples_are_filtered_before_batching(tok):
  # Captions of up to 5 objects with 32 px crops: a 96-token budget drops the longest examples.
  source = synthetic_source("a", 60, seed=4)
  iterator = P.make_train_iterator(data_config(source, seq_len=96), MODEL, tok)
  kept = []
  for _ in range(5):
    batch = next(iterator)
    assert batch["input_ids"].shape == (4, 96)
    kept.extend(iterator.last_positions.tolist())
  consumed = iterator.get_state()["next_index"]
  assert consumed > 20, "expected some examples to overflow 96 tokens and be dropped"
  # The rows kept are exactly the stream's examples that fit (lengths measured with room to spare).
  wide = P.make_train_iterator(data_config(source, seq_len=512), MODEL, tok)
  lengths = {}
  while len(lengths) < consumed:
    batch = next(wide)
    lengths.update(zip(wide.last_positions.tolist(), (batch["input_ids"] >= 0).sum(1).tolist()))
  assert kept == [k for k in range(consumed) if lengths[k] <= 96]
  # truncate_text keeps every example here (image blocks end well before token 96).
  truncating = P.make_train_iterator(data_config(source, seq_len=96, on_overflow="truncate_text"),
                                     MODEL, tok)
  rows = np.concatenate([b["input_ids"] for b in take(truncating, 5)])
  assert truncating.get_state()["next_index"] == 20
  np.testing.assert_array_equal((rows >= 0).sum(1), np.minimum([lengths[k] for k in range(20)], 96))
  with pytest.raises(ValueError, match="source 'a' record .* do not fit seq_len 96"):
    take(P.make_train_iterator(data_config(synthetic_source("a", 60, seed=4), seq_len=96,
                                           on_overflow="error"), MODEL, tok), 5)


def test_same_seed_same_batches_other_seed_other_batches(tok):
  sources = (synthetic_source("a", 30, seed=1), synthetic_source("b", 30, seed=2))
  first = take(P.make_train_iterator(data_config(*sources), MODEL, tok), 3)
  again = take(P.make_train_iterator(data_config(*sources), MODEL, tok), 3)
  other = take(P.make_train_iterator(data_config(*sources, seed=6), MODEL, tok), 3)
  assert_batches_equal(first, again)
  assert not np.array_equal(first[0]["input_ids"], other[0]["input_ids"])


def test_processes_read_disjoint_shards_that_cover_the_epoch(tok):
  cfg = data_config(synthetic_source("a", 12, seed=3), seq_len=512, global_batch_size=4)
  single = P.make_train_iterator(cfg, MODEL, tok)
  single_rows = {}
  for _ in range(3):
    batch = next(single)
    for position, ids in zip(single.last_positions, batch["input_ids"]):
      single_rows[int(position)] = ids
  records = []
  for process in range(2):
    iterator = P.make_train_iterator(cfg, MODEL, tok, process_index=process, process_count=2)
    for _ in range(3):
      batch = next(iterator)
      assert batch["input_ids"].shape == (2, 512)
      for position, ids in zip(iterator.last_positions, batch["input_ids"]):
        assert position % 2 == process
        np.testing.assert_array_equal(ids, single_rows[int(position)])
        records.append(iterator.plan.locate(int(position))[1])
  assert sorted(records) == list(range(12))   # disjoint, and together one whole epoch
  with pytest.raises(ValueError, match="not divisible by process_count 3"):
    P.make_train_iterator(cfg, MODEL, tok, process_index=0, process_count=3)


def test_state_resumes_bit_identical(tok):
  cfg = data_config(synthetic_source("a", 25, seed=1), synthetic_source("b", 15, seed=2),
                    seq_len=128)
  iterator = P.make_train_iterator(cfg, MODEL, tok)
  take(iterator, 5)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = take(iterator, 3)
  resumed = P.make_train_iterator(cfg, MODEL, tok)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)
  other = P.make_train_iterator(data_config(synthetic_source("a", 25, seed=1), seq_len=128),
                                MODEL, tok)
  with pytest.raises(ValueError, match="fingerprint"):
    other.set_state(state)


def test_worker_processes_give_the_in_process_batches(tok):
  cfg = data_config(synthetic_source("a", 30, seed=1), synthetic_source("b", 30, seed=2),
                    seq_len=128)
  expected = take(P.make_train_iterator(cfg, MODEL, tok), 4)
  workers = P.make_train_iterator(P.DataConfig(**{**cfg.__dict__, "num_workers": 2}), MODEL, tok)
  try:
    got = take(workers, 2)
    state = workers.get_state()
  finally:
    workers.close()
  assert_batches_equal(got, expected[:2])
  in_process = P.make_train_iterator(cfg, MODEL, tok)
  in_process.set_state(state)          # a state taken with workers resumes without them
  assert_batches_equal(take(in_process, 2), expected[2:])


# ----------------------------------------------------------------------------- evaluation


def test_eval_batches_are_ordered_sharded_and_padded(tok):
  eval_split = SourceConfig("a", "synthetic", options=dict(num_examples=5, seed=1, split="eval"))
  cfg = data_config(eval_split,
                    synthetic_source("b", 4, seed=2), seq_len=256, global_batch_size=4)
  whole = list(P.make_eval_batches(cfg, MODEL, tok, for_training=False))
  assert len(whole) == 3 and set(whole[0]) == {
      "input_ids", "subsegment_ids", "position_ids", "images", "image_masks", "image_input_idx",
      "valid", "source_index", "record_index"}
  valid = np.concatenate([b["valid"] for b in whole])
  assert valid.tolist() == [True] * 9 + [False] * 3
  order = [(int(s), int(r)) for b in whole for s, r in zip(b["source_index"], b["record_index"])]
  assert order[:9] == [(0, i) for i in range(5)] + [(1, i) for i in range(4)]
  last = whole[-1]
  assert (last["input_ids"][1:] == -1).all() and (last["images"][1:] == -1).all()
  # Generation prompts end with "Assistant:" and hold no answer.
  source = SyntheticRecords(synthetic.SyntheticSource(5, seed=1, split="eval"))
  prompt = tok.decode(whole[0]["input_ids"][0])
  assert prompt.rstrip().endswith("Assistant:") and source[0]["conversations"][0][1] not in prompt
  # Two processes: the same number of batches; their rows interleave into the global batches.
  shards = [list(P.make_eval_batches(cfg, MODEL, tok, for_training=False, process_index=p,
                                     process_count=2)) for p in range(2)]
  assert [len(s) for s in shards] == [3, 3]
  for t in range(3):
    joined = np.concatenate([shards[0][t]["input_ids"], shards[1][t]["input_ids"]])
    np.testing.assert_array_equal(joined, whole[t]["input_ids"])


def test_data_config_from_config_dict():
  cd = ml_collections.ConfigDict({
      "sources": [{"name": "a", "kind": "synthetic", "group": "g",
                   "options": {"num_examples": 8}}],
      "group_rates": {"g": 1.0}, "seq_len": 64, "global_batch_size": 2})
  cfg = P.DataConfig.from_dict(cd)
  assert cfg.sources[0] == SourceConfig("a", "synthetic", group="g", options={"num_examples": 8})
  assert cfg.group_rates == {"g": 1.0} and cfg.seq_len == 64
  by_name = P.DataConfig.from_dict({"sources": {"a": {"kind": "synthetic", "group": "g",
                                                      "options": {"num_examples": 8}}},
                                    "group_rates": {"g": 1.0}})
  assert by_name.sources == cfg.sources
  small = open_source(SourceConfig("s", "synthetic", options={
      "num_examples": 6, "config": {"min_side": 32, "max_side": 40}}))
  assert all(max(small[i]["image"].shape[:2]) <= 40 for i in range(6))
  with pytest.raises(ValueError, match="unknown option\\(s\\) \\['sed'\\]"):
    open_source(SourceConfig("s", "synthetic", options={"num_examples": 2, "sed": 1}))
  with pytest.raises(ValueError, match="unknown field\\(s\\) \\['seq_length'\\]"):
    P.DataConfig.from_dict({"sources": [], "seq_length": 3})
