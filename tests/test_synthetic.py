"""Tests of the demo's synthetic data (molmo_jax.data.synthetic) and its tokenizer (demo_tokenizer)."""

import json
import re
import subprocess
import sys

import grain
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from molmo_jax.data import demo_tokenizer, synthetic
from molmo_jax.preprocess import points as points_lib

CONFIG = synthetic.SyntheticConfig()
NUM_SCENES = 300


@pytest.fixture(scope="module")
def scenes():
  return [synthetic.generate_scene(i, 7, CONFIG) for i in range(NUM_SCENES)]


@pytest.fixture(scope="module")
def examples():
  source = synthetic.SyntheticSource(NUM_SCENES, seed=3, config=CONFIG, task="mixed")
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def tokenizer():
  return demo_tokenizer.build_demo_tokenizer()


def _label_kind(label):
  colour, shapes = label.split(" ")
  return colour, shapes[:-1]


def test_same_seed_and_index_give_identical_bytes():
  first = synthetic.generate_scene(11, 5, CONFIG)
  second = synthetic.generate_scene(11, 5, CONFIG)
  assert first.image.tobytes() == second.image.tobytes()
  assert first.masks.tobytes() == second.masks.tobytes()
  assert first.objects == second.objects
  a = synthetic.SyntheticSource(20, seed=5)[11]
  b = synthetic.SyntheticSource(20, seed=5)[11]
  assert a["messages"] == b["messages"] and a["image"].tobytes() == b["image"].tobytes()


def test_different_seeds_and_splits_differ():
  images_a = [synthetic.generate_scene(i, 0, CONFIG).image for i in range(10)]
  images_b = [synthetic.generate_scene(i, 1, CONFIG).image for i in range(10)]
  assert all(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(images_a, images_b))
  train, held_out = synthetic.demo_sources(10, 10, seed=4)
  assert train.stream_seed != held_out.stream_seed
  assert not any(np.array_equal(train[i]["image"], held_out[i]["image"]) for i in range(10)
                 if train[i]["image"].shape == held_out[i]["image"].shape)
  # No (seed, split) pair shares a stream with another.
  streams = {synthetic.split_seed(s, split) for s in range(50) for split in synthetic.SPLITS}
  assert len(streams) == 100


def test_scene_geometry_is_varied_and_in_bounds(scenes):
  sizes = np.array([s.image_size for s in scenes])
  assert sizes.min() >= CONFIG.min_side and sizes.max() <= CONFIG.max_side
  ratios = sizes[:, 0] / sizes[:, 1]
  assert ratios.min() < 0.6 and ratios.max() > 1.6
  counts = np.array([len(s.objects) for s in scenes])
  assert counts.min() == 0 and counts.max() == CONFIG.max_objects
  assert {s.background for s in scenes} == set(synthetic.BACKGROUNDS)
  for scene in scenes:
    assert scene.image.dtype == np.uint8 and scene.masks.dtype == bool
    assert scene.masks.shape == (len(scene.objects),) + scene.image.shape[:2]
    for obj in scene.objects:
      x0, y0, x1, y1 = obj.bbox
      assert 0 <= x0 < x1 <= scene.image_size[0] and 0 <= y0 < y1 <= scene.image_size[1]


def test_points_lie_inside_their_own_visible_masks(scenes):
  for scene in scenes:
    if not scene.objects:
      continue
    # Visible masks never share a pixel: one painted object per pixel.
    assert scene.masks.sum(0).max() == 1
    for k, (x, y) in enumerate(scene.points()):
      assert scene.masks[k, int(y), int(x)], (scene.objects[k], k)


def test_mask_pixels_carry_their_objects_colour(scenes):
  for scene in scenes[:60]:
    for obj, mask in zip(scene.objects, scene.masks):
      pixels = scene.image[mask].astype(int)
      assert len(pixels) > 0
      assert np.abs(pixels - np.asarray(synthetic.PALETTE[obj.colour])).max() <= CONFIG.colour_jitter


def test_same_kind_objects_never_touch(scenes):
  for scene in scenes:
    for i, a in enumerate(scene.objects):
      for b in scene.objects[i + 1:]:
        if a.kind != b.kind:
          continue
        gap_x = max(b.bbox[0] - a.bbox[2], a.bbox[0] - b.bbox[2])
        gap_y = max(b.bbox[1] - a.bbox[3], a.bbox[1] - b.bbox[3])
        assert max(gap_x, gap_y) >= CONFIG.same_kind_gap


def test_count_answers_equal_number_of_asked_objects():
  source = synthetic.SyntheticSource(200, seed=9, task="count")
  seen_counts = set()
  for i in range(len(source)):
    example = source[i]
    scene = synthetic.generate_scene(i, source.stream_seed, source.config)
    expected = len(scene.indices_of(*_label_kind(example["label"])))
    assert example["count"] == expected == len(example["points"]) == len(example["masks"])
    assert example["style"] == "point_count"
    question, answer = (m["content"] for m in example["messages"])
    assert example["label"] in question
    if expected == 0:
      assert answer == "There are none."
    else:
      assert answer.endswith(f"shows a total of {expected}.")
    seen_counts.add(expected)
  assert seen_counts >= {0, 1, 2, 3}


def _assert_points_match(parsed, expected, tolerance_px=1.0):
  assert parsed.shape == expected.shape
  if len(expected) == 0:
    return
  distances = np.linalg.norm(parsed[:, None] - expected[None], axis=-1)
  rows, cols = linear_sum_assignment(distances)
  assert distances[rows, cols].max() <= tolerance_px


def test_answers_parse_back_to_the_ground_truth_points(examples):
  tasks = set()
  for example in examples:
    tasks.add(example["task"])
    if example["task"] == "caption":
      continue
    answer = example["messages"][1]["content"]
    height, width = example["image"].shape[:2]
    _assert_points_match(points_lib.parse_points(answer, (width, height)), example["points"])
    if example["count"]:
      assert points_lib.is_valid_point_format(answer) or answer.startswith("Counting the <point")
  assert tasks == set(synthetic.TASKS)


def test_pointing_answers_use_the_point_tags():
  source = synthetic.SyntheticSource(60, seed=2, task="points")
  for i in range(len(source)):
    example = source[i]
    answer = example["messages"][1]["content"]
    assert example["style"] == "pointing"
    if example["count"] == 0:
      assert answer == synthetic.NONE_ANSWER
    else:
      assert points_lib.is_valid_point_format(answer)
      assert f'alt="{example["label"]}">{example["label"]}</point' in answer


def _caption_counts(caption):
  words = {w: n for n, w in enumerate(synthetic.NUMBER_WORDS)} | {"a": 1}
  counts = {}
  for number, colour, shape in re.findall(r"(\w+) (\w+) (circle|square|triangle)s?", caption):
    counts[(colour, shape)] = words[number]
  return counts


def test_captions_name_every_object_once(examples):
  captions = [(i, e) for i, e in enumerate(examples) if e["task"] == "caption"]
  assert captions
  for index, example in captions:
    caption = example["messages"][1]["content"]
    scene = synthetic.generate_scene(index, synthetic.split_seed(3, "train"), CONFIG)
    if not scene.objects:
      assert caption == synthetic.EMPTY_CAPTION
    assert _caption_counts(caption) == scene.kind_counts()
    assert example["count"] == len(scene.objects)


def test_caption_text_order_and_number_words():
  counts = {("blue", "square"): 1, ("red", "circle"): 2, ("yellow", "triangle"): 3}
  assert synthetic.caption_text(counts) == "two red circles, a blue square and three yellow triangles"
  assert synthetic.caption_text({("red", "circle"): 2, ("blue", "square"): 1}) == \
    "two red circles and a blue square"


def test_source_protocol_and_grain(examples):
  source = synthetic.SyntheticSource(12, seed=1)
  assert len(source) == 12
  assert source[-1]["messages"] == source[11]["messages"]
  with pytest.raises(IndexError):
    source[12]
  item = source[np.int64(3)]
  for key in ("image", "messages", "style", "points", "masks", "label", "count"):
    assert key in item
  assert item["points"].dtype == np.float32 and item["points"].shape == (item["count"], 2)
  assert [m["role"] for m in item["messages"]] == ["user", "assistant"]
  dataset = grain.MapDataset.source(source).shuffle(seed=0)
  firsts = sorted(dataset[i]["messages"][0]["content"] for i in range(len(dataset)))
  assert firsts == sorted(source[i]["messages"][0]["content"] for i in range(12))


def test_bad_inputs_name_the_field():
  with pytest.raises(ValueError, match="colours"):
    synthetic.SyntheticConfig(colours=("purple",))
  with pytest.raises(ValueError, match="min_side"):
    synthetic.SyntheticConfig(min_side=200)
  with pytest.raises(ValueError, match="task"):
    synthetic.SyntheticSource(4, task="vqa")
  with pytest.raises(ValueError, match="split"):
    synthetic.SyntheticSource(4, split="test")


def test_tokenizer_round_trips_generated_examples(tokenizer):
  source = synthetic.SyntheticSource(200, seed=11)
  eos_id = tokenizer.token_to_id(demo_tokenizer.EOS_TOKEN)
  for i in range(len(source)):
    example = source[i]
    question, answer = (m["content"] for m in example["messages"])
    text = demo_tokenizer.chat_text(example["style"], question, answer) + demo_tokenizer.EOS_TOKEN
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert ids[-1] == eos_id and ids.count(eos_id) == 1
    assert tokenizer.decode(tokenizer.encode(" " + answer).ids) == " " + answer
  odd = 'héllo 日本 "Click(12.3, 4.5)"\n\tx'
  assert tokenizer.decode(tokenizer.encode(odd).ids) == odd


def test_tokenizer_vocab_is_small_and_splits_digits(tokenizer):
  assert 300 < tokenizer.get_vocab_size() <= 1024
  vocab = tokenizer.get_vocab()
  assert not any(any(c.isdigit() for c in token) and len(token) > 1 for token in vocab if token != "<|endoftext|>")
  assert tokenizer.encode(' x1="12.3"').tokens == ["Ġx", "1", '="', "1", "2", ".", "3", '"']
  # Frequent words are single tokens, so answers stay short.
  for word in (" circles", " squares", " Counting", " Assistant"):
    assert len(tokenizer.encode(word).ids) == 1, word


def test_tokenizer_extra_texts_and_bad_vocab_size():
  base = demo_tokenizer.build_demo_tokenizer()
  extra = demo_tokenizer.build_demo_tokenizer(extra_texts=[" octagon"] * 50)
  assert len(extra.encode(" octagon").ids) < len(base.encode(" octagon").ids)
  with pytest.raises(ValueError, match="vocab_size"):
    demo_tokenizer.build_demo_tokenizer(vocab_size=4096)


def test_tokenizer_is_deterministic_across_processes(tokenizer, tmp_path):
  code = ("import sys; from molmo_jax.data import demo_tokenizer as d; "
          "d.save_demo_tokenizer(sys.argv[1])")
  subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
  saved = json.loads((tmp_path / "tokenizer.json").read_text())
  assert saved["model"]["vocab"] == tokenizer.get_vocab()
  assert saved["model"]["merges"] == json.loads(tokenizer.to_str())["model"]["merges"]


def test_saved_tokenizer_loads_in_transformers(tokenizer, tmp_path):
  transformers = pytest.importorskip("transformers")
  demo_tokenizer.save_demo_tokenizer(tmp_path, tokenizer)
  loaded = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
  text = ' User: How many red circles are there? Assistant: There are none.<|endoftext|>'
  assert loaded(text)["input_ids"] == tokenizer.encode(text).ids
  assert loaded.eos_token_id == tokenizer.token_to_id("<|endoftext|>")


def test_backgrounds_option_restricts_the_styles_and_keeps_default_scenes():
  plain = synthetic.SyntheticConfig(backgrounds=("plain",))
  assert {synthetic.generate_scene(i, 7, plain).background for i in range(40)} == {"plain"}
  # The default draws from every style, and the option does not change default scenes' bytes.
  default = [synthetic.generate_scene(i, 7, CONFIG) for i in range(40)]
  assert {s.background for s in default} == set(synthetic.BACKGROUNDS)
  with pytest.raises(ValueError, match="backgrounds"):
    synthetic.SyntheticConfig(backgrounds=("stripes",))
  with pytest.raises(ValueError, match="questions_per_scene"):
    synthetic.SyntheticConfig(questions_per_scene=0)


def test_questions_per_scene_packs_several_conversations_about_one_image():
  config = synthetic.SyntheticConfig(questions_per_scene=3)
  records = synthetic.SyntheticRecords(synthetic.SyntheticSource(20, seed=2, config=config))
  single = synthetic.SyntheticRecords(synthetic.SyntheticSource(20, seed=2))
  for i in range(20):
    record = records[i]
    assert len(record["conversations"]) == 3
    # The first conversation is the item's own one; the scene (image) is the same.
    assert record["conversations"][0] == single[i]["conversations"][0]
    np.testing.assert_array_equal(record["image"], single[i]["image"])
  assert len({tuple(c) for r in (records[i] for i in range(20)) for c in r["conversations"][1:]}) > 20
