"""Synthetic PixMo-style data for the built-in demo: coloured shapes to caption, count and point at.

Every scene is a pure function of (seed, index): `np.random.default_rng([seed, index])` draws the
image, a second stream `default_rng([seed, index, 1])` draws the question, so the same scene can be
asked about in every task. Small images (64..160 px sides, varied aspect ratios) with at most five
flat-coloured objects keep the task learnable by a tiny model in a few thousand steps.

Legend: H, W = image height and width in pixels, K = objects (in a scene, or matched by a question).

Coordinates are continuous pixels: pixel (row i, column j) covers [j, j+1) x [i, i+1), so the point
(x, y) lies in pixel (floor(y), floor(x)). Shapes are rasterised at pixel centres (j + 0.5, i + 0.5).

Occlusion rule (keeps the ground truth consistent): objects are painted in order, later ones on
top. An object's point is its centre (the centroid for triangles). A new object may overlap an
earlier one only if they are of different kinds, the earlier object keeps at least
`min_visible_fraction` of its area and the 3x3 pixels around its point stay visible; objects of the
same kind keep a gap of `same_kind_gap` pixels so they never merge into one blob. A placement that
breaks the rule is redrawn; after `max_placement_tries` the object is dropped. So every point lies
inside its own visible mask.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from molmo_jax.data.sources import SOURCE_KINDS, SourceKind, normalise_turns
from molmo_jax.preprocess import points as points_lib

SHAPES = ("circle", "square", "triangle")
PALETTE = {
  "red": (220, 40, 40),
  "green": (40, 170, 60),
  "blue": (40, 80, 225),
  "yellow": (240, 205, 30),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
BACKGROUNDS = ("plain", "gradient", "noise")
TASKS = ("count", "points", "caption")

# Which reference style each task trains (the reference's olmo/data/data_formatter.py (style prefixes)).
TASK_STYLES = {"count": "point_count", "points": "pointing", "caption": "long_caption"}
COUNT_TEMPLATES = ("How many {label} are there?", "Count the {label}.")
POINT_TEMPLATES = ("Point to the {label}.", 'Point to all occurrences of "{label}"')
CAPTION_TEMPLATES = ("Describe this image.", "What is in this image?")
EMPTY_CAPTION = "an empty background"
NONE_ANSWER = "There are none."

Task = Literal["mixed", "count", "points", "caption"]


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """What scenes look like and how often each task is asked."""

  min_side: int = 64
  max_side: int = 160
  max_objects: int = 5
  max_kinds_per_scene: int = 3                  # fewer kinds -> more repeats of one kind to count
  shapes: tuple[str, ...] = SHAPES
  colours: tuple[str, ...] = tuple(PALETTE)
  min_size_fraction: float = 0.14               # object side / image short side
  max_size_fraction: float = 0.26
  min_object_size: int = 8                      # pixels
  colour_jitter: int = 12                       # per-channel +- jitter of an object's colour
  min_visible_fraction: float = 0.6
  same_kind_gap: int = 2
  max_placement_tries: int = 30
  absent_query_probability: float = 0.15        # ask about a kind that is not in the scene
  task_weights: tuple[float, float, float] = (0.4, 0.4, 0.2)   # count, points, caption
  backgrounds: tuple[str, ...] = BACKGROUNDS     # background styles drawn from (plain/gradient/noise)
  questions_per_scene: int = 1                   # training records: conversations about one image

  def __post_init__(self):
    if not 16 <= self.min_side <= self.max_side:
      raise ValueError(f"SyntheticConfig.min_side/max_side: need 16 <= min_side <= max_side, "
                       f"got {self.min_side}, {self.max_side}")
    if not 0 <= self.max_objects < len(NUMBER_WORDS):
      raise ValueError(f"SyntheticConfig.max_objects: expected 0..{len(NUMBER_WORDS) - 1}, "
                       f"got {self.max_objects}")
    if self.max_kinds_per_scene < 1:
      raise ValueError(f"SyntheticConfig.max_kinds_per_scene: expected >= 1, got {self.max_kinds_per_scene}")
    unknown = [s for s in self.shapes if s not in SHAPES]
    if unknown or not self.shapes:
      raise ValueError(f"SyntheticConfig.shapes: expected a non-empty subset of {SHAPES}, got {self.shapes}")
    unknown = [c for c in self.colours if c not in PALETTE]
    if unknown or not self.colours:
      raise ValueError(f"SyntheticConfig.colours: expected a non-empty subset of {tuple(PALETTE)}, "
                       f"got {self.colours}")
    if not 0 < self.min_size_fraction <= self.max_size_fraction <= 0.5:
      raise ValueError(f"SyntheticConfig.min/max_size_fraction: need 0 < min <= max <= 0.5, got "
                       f"{self.min_size_fraction}, {self.max_size_fraction}")
    if not 4 <= self.min_object_size <= self.min_side // 2:
      raise ValueError(f"SyntheticConfig.min_object_size: expected 4..min_side/2, got {self.min_object_size}")
    unknown = [b for b in self.backgrounds if b not in BACKGROUNDS]
    if unknown or not self.backgrounds:
      raise ValueError(f"SyntheticConfig.backgrounds: expected a non-empty subset of {BACKGROUNDS}, "
                       f"got {self.backgrounds}")
    if self.questions_per_scene < 1:
      raise ValueError(f"SyntheticConfig.questions_per_scene: expected >= 1, got {self.questions_per_scene}")
    if len(self.task_weights) != len(TASKS) or min(self.task_weights) < 0 or sum(self.task_weights) <= 0:
      raise ValueError(f"SyntheticConfig.task_weights: expected 3 non-negative weights (count, points, "
                       f"caption) with a positive sum, got {self.task_weights}")

  @property
  def kinds(self) -> tuple[tuple[str, str], ...]:
    """Every (colour, shape) pair, in a fixed order (colour-major)."""
    return tuple((c, s) for c in self.colours for s in self.shapes)


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One painted shape. `bbox` is (x0, y0, x1, y1), x1/y1 exclusive; `centre` is its GT point."""

  shape: str
  colour: str
  size: int
  centre: tuple[float, float]
  bbox: tuple[int, int, int, int]

  @property
  def kind(self) -> tuple[str, str]:
    return (self.colour, self.shape)


@dataclasses.dataclass(frozen=True)
class SyntheticScene:
  """A rendered scene. image: [H, W, 3] uint8; masks: [K, H, W] bool, visible pixels per object."""

  image: np.ndarray
  objects: tuple[SceneObject, ...]
  masks: np.ndarray
  background: str

  @property
  def image_size(self) -> tuple[int, int]:
    """(width, height), the order points are scaled by."""
    return (int(self.image.shape[1]), int(self.image.shape[0]))

  def points(self, indices=None) -> np.ndarray:
    """[K, 2] float32 (x, y) pixel points of the chosen objects (all by default)."""
    chosen = range(len(self.objects)) if indices is None else indices
    pts = [self.objects[i].centre for i in chosen]
    return np.asarray(pts, np.float32).reshape(-1, 2)

  def indices_of(self, colour: str, shape: str) -> list[int]:
    return [i for i, o in enumerate(self.objects) if o.kind == (colour, shape)]

  def kind_counts(self) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for o in self.objects:
      counts[o.kind] = counts.get(o.kind, 0) + 1
    return counts


# ----------------------------------------------------------------------------- rendering


def _pixel_centres(x0: int, y0: int, x1: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
  ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
  xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
  return xs, ys


def shape_mask(shape: str, x0: int, y0: int, size: int, height: int, width: int) -> np.ndarray:
  """[H, W] bool: pixels whose centre lies in the shape with top-left corner (x0, y0) and side `size`."""
  mask = np.zeros((height, width), bool)
  xs, ys = _pixel_centres(x0, y0, x0 + size, y0 + size)
  half = size / 2
  cx, cy = x0 + half, y0 + half
  if shape == "circle":
    inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= half ** 2
  elif shape == "square":
    inside = np.ones((size, size), bool)
  elif shape == "triangle":
    # Apex at the top centre, base along the bottom edge: the half-width grows linearly downwards.
    inside = np.abs(xs - cx) <= half * (ys - y0) / size
  else:
    raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")
  mask[y0:y0 + size, x0:x0 + size] = inside
  return mask


def shape_centre(shape: str, x0: int, y0: int, size: int) -> tuple[float, float]:
  """The GT point: bbox centre for circles and squares, centroid for triangles."""
  if shape == "triangle":
    return (x0 + size / 2, y0 + 2 * size / 3)
  return (x0 + size / 2, y0 + size / 2)


def render_background(rng: np.random.Generator, height: int, width: int,
                      kinds: tuple[str, ...] = BACKGROUNDS) -> tuple[np.ndarray, str]:
  """[H, W, 3] float32 near-neutral background, dark or light so saturated objects stand out."""
  kind = kinds[rng.integers(len(kinds))]
  level = rng.uniform(20, 80) if rng.random() < 0.35 else rng.uniform(185, 245)
  base = level + rng.uniform(-12, 12, size=3)
  image = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
  if kind == "gradient":
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (np.cos(angle) * xs / width + np.sin(angle) * ys / height)[..., None]
    image = image + rng.uniform(-35, 35, size=3).astype(np.float32) * ramp
  elif kind == "noise":
    image = image + rng.normal(0, 7, size=(height, width, 3)).astype(np.float32)
  return image, kind


def _placement_ok(candidate: np.ndarray, shape_kind: tuple[str, str], bbox, placed: list[dict],
                  config: SyntheticConfig) -> bool:
  """Checks a new object's full mask against the already placed objects (module docstring rule)."""
  x0, y0, x1, y1 = bbox
  gap = config.same_kind_gap
  for other in placed:
    ox0, oy0, ox1, oy1 = other["bbox"]
    if other["kind"] == shape_kind:
      if x0 < ox1 + gap and ox0 < x1 + gap and y0 < oy1 + gap and oy0 < y1 + gap:
        return False
      continue
    remaining = other["visible"] & ~candidate
    if remaining.sum() < config.min_visible_fraction * other["area"]:
      return False
    px, py = int(other["centre"][0]), int(other["centre"][1])
    if not remaining[py - 1:py + 2, px - 1:px + 2].all():
      return False
  return True


def _choose_kinds(rng: np.random.Generator, num_objects: int, config: SyntheticConfig) -> list[tuple[str, str]]:
  """Draws a few distinct kinds and spreads the objects over them, so counts above one are common."""
  kinds = config.kinds
  num_kinds = int(rng.integers(1, min(num_objects, config.max_kinds_per_scene, len(kinds)) + 1))
  chosen = [kinds[i] for i in rng.choice(len(kinds), size=num_kinds, replace=False)]
  assignment = list(chosen) + [chosen[i] for i in rng.integers(num_kinds, size=num_objects - num_kinds)]
  return [assignment[i] for i in rng.permutation(num_objects)]


def generate_scene(index: int, seed: int, config: SyntheticConfig = SyntheticConfig()) -> SyntheticScene:
  """Renders scene `index` of the stream `seed`; identical bytes for identical arguments."""
  rng = np.random.default_rng([seed, index])
  width = int(rng.integers(config.min_side, config.max_side + 1))
  height = int(rng.integers(config.min_side, config.max_side + 1))
  canvas, background = render_background(rng, height, width, config.backgrounds)
  num_objects = int(rng.integers(0, config.max_objects + 1))
  kinds = _choose_kinds(rng, num_objects, config) if num_objects else []

  short_side = min(width, height)
  placed: list[dict] = []
  for colour, shape in kinds:
    size = int(round(short_side * rng.uniform(config.min_size_fraction, config.max_size_fraction)))
    size = max(size, config.min_object_size)
    for _ in range(config.max_placement_tries):
      x0 = int(rng.integers(0, width - size + 1))
      y0 = int(rng.integers(0, height - size + 1))
      candidate = shape_mask(shape, x0, y0, size, height, width)
      bbox = (x0, y0, x0 + size, y0 + size)
      if _placement_ok(candidate, (colour, shape), bbox, placed, config):
        break
    else:
      continue  # no room: drop the object (module docstring)
    for other in placed:
      other["visible"] &= ~candidate
    jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3)
    canvas[candidate] = np.asarray(PALETTE[colour]) + jitter
    placed.append(dict(kind=(colour, shape), size=size, bbox=bbox, visible=candidate,
                       area=int(candidate.sum()), centre=shape_centre(shape, x0, y0, size)))

  objects = tuple(SceneObject(shape=p["kind"][1], colour=p["kind"][0], size=p["size"],
                              centre=p["centre"], bbox=p["bbox"]) for p in placed)
  masks = np.stack([p["visible"] for p in placed]) if placed else np.zeros((0, height, width), bool)
  image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
  return SyntheticScene(image=image, objects=objects, masks=masks, background=background)


# ----------------------------------------------------------------------------- text


def plural(shape: str) -> str:
  return shape + "s"


def kind_label(colour: str, shape: str) -> str:
  """The label a question names, always plural as in PixMo-Count: "red circles"."""
  return f"{colour} {plural(shape)}"


def _count_phrase(count: int, colour: str, shape: str) -> str:
  if count == 1:
    return f"a {colour} {shape}"
  return f"{NUMBER_WORDS[count]} {colour} {plural(shape)}"


def caption_text(kind_counts: dict[tuple[str, str], int], config: SyntheticConfig = SyntheticConfig()) -> str:
  """"two red circles and a blue square": kinds in the config's colour-major order."""
  phrases = [_count_phrase(kind_counts[k], *k) for k in config.kinds if kind_counts.get(k, 0) > 0]
  if not phrases:
    return EMPTY_CAPTION
  if len(phrases) == 1:
    return phrases[0]
  return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def count_answer(points_px: np.ndarray, image_size: tuple[int, int], label: str) -> str:
  return points_lib.format_count_answer(points_px, image_size, label)


def pointing_answer(points_px: np.ndarray, image_size: tuple[int, int], label: str) -> str:
  if len(points_px) == 0:
    return NONE_ANSWER
  return points_lib.format_points(points_px, image_size, label)


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
  return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _query_kind(scene: SyntheticScene, rng: np.random.Generator, config: SyntheticConfig) -> tuple[str, str]:
  present = sorted(scene.kind_counts(), key=config.kinds.index)
  absent = [k for k in config.kinds if k not in present]
  if not present or (absent and rng.random() < config.absent_query_probability):
    return absent[rng.integers(len(absent))]
  return present[rng.integers(len(present))]


def _example(scene, task, question, answer, indices, label) -> dict:
  return {
    "image": scene.image,
    "messages": _conversation(question, answer),
    "style": TASK_STYLES[task],
    "task": task,
    "points": scene.points(indices),
    "masks": scene.masks[np.asarray(indices, np.int64)],
    "label": label,
    "count": len(indices),
  }


def count_example(scene: SyntheticScene, rng: np.random.Generator, config: SyntheticConfig) -> dict:
  """"How many red circles are there?" answered in the reference counting format (the reference's olmo/data/data_formatter.py (point and count answers))."""
  colour, shape = _query_kind(scene, rng, config)
  label = kind_label(colour, shape)
  indices = scene.indices_of(colour, shape)
  question = COUNT_TEMPLATES[rng.integers(len(COUNT_TEMPLATES))].format(label=label)
  return _example(scene, "count", question, count_answer(scene.points(indices), scene.image_size, label),
                  indices, label)


def pointing_example(scene: SyntheticScene, rng: np.random.Generator, config: SyntheticConfig) -> dict:
  """"Point to the blue squares." answered with <point>/<points> tags, or "There are none."."""
  colour, shape = _query_kind(scene, rng, config)
  label = kind_label(colour, shape)
  indices = scene.indices_of(colour, shape)
  question = POINT_TEMPLATES[rng.integers(len(POINT_TEMPLATES))].format(label=label)
  return _example(scene, "points", question, pointing_answer(scene.points(indices), scene.image_size, label),
                  indices, label)


def caption_example(scene: SyntheticScene, rng: np.random.Generator, config: SyntheticConfig) -> dict:
  """A short caption naming every object; "points"/"masks" cover all objects, "label" is empty."""
  question = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
  indices = list(range(len(scene.objects)))
  return _example(scene, "caption", question, caption_text(scene.kind_counts(), config), indices, "")


_BUILDERS = {"count": count_example, "points": pointing_example, "caption": caption_example}


def build_example(scene: SyntheticScene, task: str, rng: np.random.Generator,
                  config: SyntheticConfig = SyntheticConfig()) -> dict:
  if task == "mixed":
    weights = np.asarray(config.task_weights, np.float64)
    task = TASKS[rng.choice(len(TASKS), p=weights / weights.sum())]
  if task not in _BUILDERS:
    raise ValueError(f"task: expected 'mixed' or one of {TASKS}, got {task!r}")
  return _BUILDERS[task](scene, rng, config)


# ----------------------------------------------------------------------------- source

SPLITS = ("train", "eval")


def split_seed(seed: int, split: str) -> int:
  """Distinct streams per split, so train and eval never share a (seed, index) pair."""
  if split not in SPLITS:
    raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
  if seed < 0:
    raise ValueError(f"seed: expected a non-negative integer, got {seed}")
  return 2 * seed + SPLITS.index(split)


class SyntheticSource:
  """Random-access source of synthetic examples (grain's RandomAccessDataSource protocol).

  Each item is a dict: image [H, W, 3] uint8, messages (user question, assistant answer), style,
  task, points [K, 2] float32 pixels, masks [K, H, W] bool, label (str), count (int = K).
  """

  def __init__(self, num_examples: int, seed: int = 0, config: SyntheticConfig = SyntheticConfig(),
               task: Task = "mixed", split: str = "train"):
    if num_examples < 0:
      raise ValueError(f"num_examples: expected >= 0, got {num_examples}")
    if task != "mixed" and task not in TASKS:
      raise ValueError(f"task: expected 'mixed' or one of {TASKS}, got {task!r}")
    self.num_examples = int(num_examples)
    self.seed = int(seed)
    self.config = config
    self.task = task
    self.split = split
    self.stream_seed = split_seed(self.seed, split)

  def __len__(self) -> int:
    return self.num_examples

  def _checked_index(self, index) -> int:
    index = int(index)
    if index < 0:
      index += self.num_examples
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for a SyntheticSource of {self.num_examples} examples")
    return index

  def _question(self, scene: SyntheticScene, index: int, k: int = 0) -> dict:
    """Question k about scene `index`, drawn from its own stream [seed, index, 1 + k]."""
    rng = np.random.default_rng([self.stream_seed, index, 1 + k])
    return build_example(scene, self.task, rng, self.config)

  def __getitem__(self, index) -> dict:
    index = self._checked_index(index)
    return self._question(generate_scene(index, self.stream_seed, self.config), index)

  def conversations(self, index) -> tuple[dict, list[list[dict[str, str]]]]:
    """Item `index` and `config.questions_per_scene` conversations about its scene: the item's
    own first, then further questions drawn from their own streams ([seed, index, 1 + k])."""
    index = self._checked_index(index)
    scene = generate_scene(index, self.stream_seed, self.config)
    item = self._question(scene, index)
    extra = [self._question(scene, index, k)["messages"]
             for k in range(1, self.config.questions_per_scene)]
    return item, [item["messages"], *extra]

  def __repr__(self) -> str:
    # grain keys checkpoints of the iterator state by the source's repr.
    return (f"SyntheticSource(num_examples={self.num_examples}, seed={self.seed}, task={self.task!r}, "
            f"split={self.split!r}, config={self.config!r})")


def demo_sources(num_train: int, num_eval: int, seed: int = 0, config: SyntheticConfig = SyntheticConfig(),
                 task: Task = "mixed") -> tuple[SyntheticSource, SyntheticSource]:
  """The demo's train and held-out eval sources (disjoint streams)."""
  return (SyntheticSource(num_train, seed, config, task, split="train"),
          SyntheticSource(num_eval, seed, config, task, split="eval"))


# --------------------------------------------------------------------------------------------
# The "synthetic" data source kind (registered on import; recipes list this module in
# config.plugins)
# --------------------------------------------------------------------------------------------

class SyntheticRecords:
  """`SyntheticSource` items in the record schema of molmo_jax.data.sources (the scene's metadata
  is kept)."""

  def __init__(self, source: SyntheticSource):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index) -> dict:
    item, conversations = self.source.conversations(index)
    item = dict(item)
    del item["messages"]
    item["conversations"] = [normalise_turns(c, f"synthetic[{index}]") for c in conversations]
    return item

  def __repr__(self) -> str:
    return f"SyntheticRecords({self.source!r})"


def open_synthetic(cfg) -> SyntheticRecords:
  """A `SourceConfig` of kind "synthetic" -> its records."""
  options = dict(cfg.options)
  if "num_examples" not in options:
    raise ValueError(f"source {cfg.name!r}: synthetic sources need options.num_examples")
  scene_config = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in dict(options.pop("config", {})).items()}
  return SyntheticRecords(SyntheticSource(config=SyntheticConfig(**scene_config), **options))


SOURCE_KINDS.register("synthetic", SourceKind(
    open_synthetic, ("num_examples", "seed", "split", "task", "config"), needs_path=False))
