"""Test set-up: CPU-only JAX with 8 simulated host devices.

These variables must be set before jax is first imported, which is why they live here.
"""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# libtpu (the `tpu` extra, used only for compile-only planning) must never hold its lockfile
# against the subprocesses some tests start.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
