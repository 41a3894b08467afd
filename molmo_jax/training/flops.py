"""Analytic FLOPs of a train step and model-FLOPs utilisation (MFU).

Legend: B batch, T tokens, N crop slots per example, S = P + 1 ViT positions per crop, Q pooled
cells per crop, D LLM width, H/K query/kv heads, h head dim, F MLP width (per SwiGLU branch),
E experts, k experts per token, V_emb LM-head rows, L layers; a "v" suffix = the vision tower.

Counting convention (MaxText's): a matmul [m, n] x [n, p] costs 2·m·n·p; a training step costs
3x the forward pass (backward = 2x forward); rematerialisation is NOT counted (this is model
FLOPs, not hardware FLOPs); causal attention counts half of the T x T score and value matmuls.
Everything runs on the static padded shapes the step compiles for (all N crop slots, all T
tokens), since that is the work the chips do.

Per-token forward FLOPs of one LLM layer:
  projections  2·D·(H + 2K)·h + 2·H·h·D
  attention    2·2·T·H·h / 2            (QKᵀ and AV, causal half)
  MLP          2·3·D·F                  dense SwiGLU
               2·D·E + k·2·3·D·F_e      MoE: router + k experts
plus 2·D·V_emb per token for the LM head.
Per crop: patch embedding 2·P·C·Dv, then per ViT layer and position 2·4·Dv·Hv·hv (q, k, v, out),
4·S·Hv·hv (bidirectional attention), 2·2·Dv·Fv (fc1, fc2); the connector's attention pooling and
SwiGLU projector per pooled cell.

`compiled.cost_analysis()` is no substitute: it counts a scanned layer body once, not L times.
"""

from __future__ import annotations

import dataclasses
import re

from molmo_jax.config import MolmoConfig

# Peak dense bf16 FLOP/s per chip, from the vendors' data sheets. Matched against
# `jax.Device.device_kind` in order; the first regex that matches wins.
PEAK_FLOPS_PER_DEVICE: tuple[tuple[str, str, float], ...] = (
    (r"v6 ?lite|v6e", "TPU v6e", 918e12),
    (r"v5 ?lite|v5e", "TPU v5e", 197e12),
    (r"v5p|tpu v5$", "TPU v5p", 459e12),
    (r"tpu v4", "TPU v4", 275e12),
    (r"h200", "NVIDIA H200", 989e12),
    (r"h100", "NVIDIA H100", 989e12),
)
# No data sheet applies to a host CPU; this nominal figure (about one modern server socket's fp32
# FMA throughput) only keeps the MFU column meaningful as a relative number. Override it with the
# config's `peak_flops_per_device` when you know your machine.
CPU_DEFAULT_PEAK_FLOPS = 1e12


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Forward FLOPs by component and the training total (3x forward)."""

  vision: float
  connector: float
  llm: float

  @property
  def forward(self) -> float:
    return self.vision + self.connector + self.llm

  @property
  def train(self) -> float:
    return 3.0 * self.forward


def llm_forward_flops(model_cfg: MolmoConfig, batch: int, seq_len: int) -> float:
  """Forward FLOPs of the decoder (layers + LM head) on [batch, seq_len] tokens."""
  llm = model_cfg.llm
  d, h, hq, hk = llm.d_model, llm.head_dim, llm.num_heads, llm.num_kv_heads
  projections = 2 * d * (hq + 2 * hk) * h + 2 * hq * h * d
  attention = 2 * 2 * seq_len * hq * h / 2
  if llm.is_moe:
    mlp = 2 * d * llm.num_experts + llm.experts_per_token * 2 * 3 * d * llm.expert_mlp_dim
  else:
    mlp = 2 * 3 * d * llm.mlp_dim
  per_token = llm.num_layers * (projections + attention + mlp) + 2 * d * llm.embedding_size
  return float(batch * seq_len * per_token)


def vision_forward_flops(model_cfg: MolmoConfig, crops: int) -> float:
  """Forward FLOPs of the ViT over `crops` crops (every block runs, selected or not)."""
  vis = model_cfg.vision
  positions = vis.num_positions
  inner = vis.num_heads * vis.head_dim
  per_position = (2 * 4 * vis.width * inner           # q, k, v, out projections
                  + 2 * 2 * positions * inner          # scores and weighted values
                  + 2 * 2 * vis.width * vis.mlp_dim)   # fc1, fc2
  patch_embed = 2 * vis.num_patches * vis.patch_dim * vis.width
  return float(crops * (patch_embed + vis.num_layers * positions * per_position))


def connector_forward_flops(model_cfg: MolmoConfig, crops: int) -> float:
  """Forward FLOPs of attention pooling + projector over `crops` crops."""
  vis, con = model_cfg.vision, model_cfg.connector
  concat = len(vis.selected_layers) * vis.width
  d = model_cfg.llm.d_model
  if con.pooling == "attention_meanq":
    grid_h = -(-vis.grid_size // con.pool_height)
    grid_w = -(-vis.grid_size // con.pool_width)
    cells, window = grid_h * grid_w, con.pool_height * con.pool_width
    inner = con.pool_heads * con.pool_head_dim
    pooling = (cells * 2 * concat * inner                 # query (window mean)
               + cells * window * 2 * 2 * concat * inner   # keys and values of every window patch
               + cells * 2 * 2 * window * inner            # scores and weighted values
               + cells * 2 * inner * vis.width)            # output projection
    projector_in = vis.width
  else:
    cells, pooling, projector_in = vis.num_patches, 0, concat
  projector = cells * 2 * (2 * projector_in * con.projector_hidden + con.projector_hidden * d)
  return float(crops * (pooling + projector))


def train_step_flops(model_cfg: MolmoConfig, batch: int, seq_len: int, crops_per_example: int) -> StepFlops:
  """FLOPs of one optimizer step on a global batch (see the module docstring)."""
  crops = batch * crops_per_example
  return StepFlops(vision=vision_forward_flops(model_cfg, crops),
                   connector=connector_forward_flops(model_cfg, crops),
                   llm=llm_forward_flops(model_cfg, batch, seq_len))


def peak_flops_per_device(device_kind: str, platform: str = "") -> tuple[str, float]:
  """(chip name, peak FLOP/s) for a `jax.Device.device_kind`; CPUs get the nominal default."""
  kind = device_kind.lower()
  for pattern, name, peak in PEAK_FLOPS_PER_DEVICE:
    if re.search(pattern, kind):
      return name, peak
  if platform == "cpu" or "cpu" in kind:
    return "CPU (nominal)", CPU_DEFAULT_PEAK_FLOPS
  raise ValueError(f"no peak FLOP/s known for device kind {device_kind!r} (platform {platform!r}); "
                   "set the config's peak_flops_per_device")


def mfu(step_flops: float, step_seconds: float, num_devices: int, peak_per_device: float) -> float:
  """Model-FLOPs utilisation: achieved FLOP/s over the peak of all devices."""
  if step_seconds <= 0 or num_devices < 1 or peak_per_device <= 0:
    raise ValueError(f"mfu: need positive time, devices and peak, got {step_seconds}, "
                     f"{num_devices}, {peak_per_device}")
  return step_flops / step_seconds / (num_devices * peak_per_device)
