"""Seeing inside the model: intermediate values returned on request (big_vision's `out` dict idea).

    logits, out = Molmo(cfg).apply({"params": params}, batch, capture=("decoder", "router"))
    out["captured"]["decoder_layers"]     # [L, B, T, D] every decoder layer's output

Legend: B batch, N crops per example, L layers (ViT or decoder), S ViT tokens per crop (CLS
first), Dv ViT width, K selected ViT layers, Q pooled cells per crop, T tokens, D LLM width,
k experts per token.

Groups (pass any of them, or "all"), and what each puts in out["captured"]:
  "vit"        vit_embeddings [B*N, S, Dv]    input of the first block (CLIP hidden_states[0])
               vit_layers     [L, B*N, S, Dv] every block's output (CLIP hidden_states[1:])
               vit_selected   [K, B*N, S, Dv] the blocks the connector reads, in config order
  "connector"  image_pooled   [B*N, Q, Dv]    attention-pooled cells, before the projector
               image_features [B, N*Q, D]     projected features added to the <im_patch> tokens
  "decoder"    decoder_embeddings [B, T, D]   token embeddings + image features (hidden_states[0]
                                              of transformers' output_hidden_states)
               decoder_layers [L, B, T, D]    every block's output, before the final norm
                                              (transformers' hidden_states[1:L]; its last entry is
                                              out["hidden"], the final norm applied)
  "router"     router_experts [L, B, T, k] int32 and router_weights [L, B, T, k] float32: each MoE
                                              layer's top-k expert indices and their weights
Crops of the batch's padding slots are included (their values are meaningless); the vision groups
are empty when the batch has no images or precomputed image features are passed.

Each group is its own Flax collection ("capture_<group>"), written with `sow` only when the
caller made it mutable: a forward pass that captures nothing traces exactly the ops it traced
before (scanned layers stack their captures on the layer axis; jit and remat work as usual).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import flax.linen as nn

GROUPS: dict[str, tuple[str, ...]] = {
    "vit": ("vit_embeddings", "vit_layers", "vit_selected"),
    "connector": ("image_pooled", "image_features"),
    "decoder": ("decoder_embeddings", "decoder_layers"),
    "router": ("router_experts", "router_weights"),
}
_GROUP_OF = {name: group for group, names in GROUPS.items() for name in names}


def collection(group: str) -> str:
  return f"capture_{group}"


def resolve(capture: str | Iterable[str] | None) -> tuple[str, ...]:
  """Requested groups, checked: None/() -> (), "all" -> every group, else the names given."""
  if not capture:
    return ()
  names = (capture,) if isinstance(capture, str) else tuple(capture)
  if "all" in names:
    return tuple(GROUPS)
  unknown = [n for n in names if n not in GROUPS]
  if unknown:
    raise ValueError(f"capture: unknown group(s) {unknown}; known: {list(GROUPS)} or 'all'")
  return tuple(dict.fromkeys(names))


def sow(module: nn.Module, name: str, value: Any) -> None:
  """Stores `value` under `name` if its group was requested; otherwise does nothing (no op is
  traced). Never during init, so parameter trees never contain captures."""
  coll = collection(_GROUP_OF[name])
  if module.is_mutable_collection(coll) and not module.is_initializing():
    module.sow(coll, name, value, reduce_fn=lambda _, y: y, init_fn=lambda: None)


def collect(state: Mapping[str, Any], groups: tuple[str, ...]) -> dict[str, Any]:
  """The sown values of `groups`, flattened from the module tree to {name: array}."""
  out: dict[str, Any] = {}
  for group in groups:
    _flatten(state.get(collection(group), {}), out)
  return out


def _flatten(tree: Any, out: dict[str, Any]) -> None:
  for key, value in tree.items():
    if key in _GROUP_OF:
      out[key] = value
    elif isinstance(value, Mapping):
      _flatten(value, out)
