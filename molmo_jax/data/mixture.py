"""The training mixture: which source and record each position of the stream reads.

Position k = 0, 1, 2, ... of one endless stream (shared by all processes) maps to a record by a
pure function (`MixturePlan`), so any position can be read without reading the ones before it:
  source(k) ~ Categorical(rates)       i.i.d. per position, from a fixed-seed RNG
  n = number of earlier positions that drew the same source
  record(k) = shuffle_{seed, source, epoch}(n mod size)   with epoch = n // size, a fresh
              permutation of each source every epoch (identity when shuffle is off)
The rates follow the reference's launch_scripts/train_multitask_model.py and train_captioner.py
(`mixture_rates`: explicit rates, or sqrt(size), optionally within weighted groups).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from molmo_jax.data.sources import SourceConfig

_MIX_SALT, _SHUFFLE_SALT = 0x6D6978, 0x736866



def mixture_rates(sources: Sequence[SourceConfig], sizes: Sequence[int],
                  group_rates: Mapping[str, float] | None = None) -> np.ndarray:
  """Normalised sampling rate of each source (the reference's launch_scripts/train_multitask_model.py and train_captioner.py).

  Without group rates: the explicit `rate`s if every source has one, else sqrt(size) for all
  (`size` overrides the true length). With group rates: the same rule within each group, scaled
  by the group's rate, then everything renormalised.
  """
  if len(sources) != len(sizes):
    raise ValueError(f"mixture_rates: {len(sources)} sources but {len(sizes)} sizes")
  if group_rates:
    rates = np.zeros(len(sources))
    for group, group_rate in group_rates.items():
      members = [i for i, s in enumerate(sources) if s.group == group]
      if not members:
        raise ValueError(f"group_rates: group {group!r} has no source")
      if not group_rate > 0:
        raise ValueError(f"group_rates: group {group!r} needs a positive rate, got {group_rate}")
      weights = _rule_weights([sources[i] for i in members], [sizes[i] for i in members])
      rates[members] = group_rate * weights / weights.sum()
    orphans = [s.name for s in sources if s.group not in group_rates]
    if orphans:
      raise ValueError(f"sources {orphans} have no group in group_rates {sorted(group_rates)}")
  else:
    grouped = [s.name for s in sources if s.group is not None]
    if grouped:
      raise ValueError(f"sources {grouped} name a group, but DataConfig.group_rates is empty")
    rates = _rule_weights(sources, sizes)
  return rates / rates.sum()


def _rule_weights(sources: Sequence[SourceConfig], sizes: Sequence[int]) -> np.ndarray:
  explicit = [s.rate is not None for s in sources]
  if all(explicit):
    return np.array([s.rate for s in sources], np.float64)
  if any(explicit):
    raise ValueError(f"sources {[s.name for s in sources if s.rate is None]} have no rate but "
                     f"{[s.name for s in sources if s.rate is not None]} do; give every source "
                     "(of a group) a rate, or none to use the sqrt(size) rule")
  return np.sqrt([s.size or size for s, size in zip(sources, sizes)]).astype(np.float64)


class MixturePlan:
  """Stream position -> (source, record, epoch), a pure function of (seed, rates, sizes).

  Source draws come in blocks of `block` positions from `default_rng([seed, salt, block])`;
  per-block counts are accumulated lazily, so locating position k costs O(k / block) once and
  O(1) after. Picklable (caches are rebuilt in worker processes).
  """

  def __init__(self, sizes: Sequence[int], rates: Sequence[float], seed: int, shuffle: bool,
               block: int = 4096):
    self.sizes = [int(n) for n in sizes]
    if any(n < 1 for n in self.sizes):
      raise ValueError(f"MixturePlan: every source needs at least one record, sizes {self.sizes}")
    self.rates = np.asarray(rates, np.float64)
    self.seed, self.shuffle, self.block = int(seed), bool(shuffle), int(block)
    self._cumulative = np.cumsum(self.rates / self.rates.sum())
    self._reset_caches()

  def _reset_caches(self):
    self._prefix = [np.zeros(len(self.sizes), np.int64)]   # draws of each source before block b
    self._draws: dict[int, np.ndarray] = {}
    self._permutations: dict[tuple[int, int], np.ndarray] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_prefix"], state["_draws"], state["_permutations"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset_caches()

  def _block_draws(self, b: int) -> np.ndarray:
    if b not in self._draws:
      if len(self._draws) >= 4:
        self._draws.pop(next(iter(self._draws)))
      u = np.random.default_rng([self.seed, _MIX_SALT, b]).random(self.block)
      draws = np.searchsorted(self._cumulative, u, side="right")
      self._draws[b] = np.minimum(draws, len(self.sizes) - 1)
    return self._draws[b]

  def locate(self, position: int) -> tuple[int, int, int]:
    """(source index, record index, epoch of that source) of stream position `position`."""
    if position < 0:
      raise ValueError(f"stream position must be >= 0, got {position}")
    b, offset = divmod(int(position), self.block)
    while len(self._prefix) <= b:
      earlier = len(self._prefix) - 1
      counts = np.bincount(self._block_draws(earlier), minlength=len(self.sizes))
      self._prefix.append(self._prefix[-1] + counts)
    draws = self._block_draws(b)
    source = int(draws[offset])
    n = int(self._prefix[b][source]) + int(np.count_nonzero(draws[:offset] == source))
    epoch, within = divmod(n, self.sizes[source])
    if self.shuffle:
      within = int(self._permutation(source, epoch)[within])
    return source, within, epoch

  def _permutation(self, source: int, epoch: int) -> np.ndarray:
    # Explicit permutations, not grain's index_shuffle: that one takes milliseconds per call on
    # small sources. A few (source, epoch) pairs are live at a time, so the cache stays small.
    key = (source, epoch)
    if key not in self._permutations:
      if len(self._permutations) >= 2 * len(self.sizes):
        self._permutations.pop(next(iter(self._permutations)))
      rng = np.random.default_rng([self.seed, _SHUFFLE_SALT, source, epoch])
      self._permutations[key] = rng.permutation(self.sizes[source])
    return self._permutations[key]
