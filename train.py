r"""Train (or fine-tune) a Molmo: a thin command line over molmo_jax.training.loop.train.

  python train.py --config configs/finetune_custom.py:model=ckpt/molmo-7b-d,data=data/train.jsonl \
      --workdir runs/my-run [--config.total_steps=2000] [--config.model.dtype=float32 ...]
  python train.py --config configs/tiny_test.py --workdir runs/tiny --help   # every recipe field

--config FILE[:ARG]   a recipe: FILE's get_config(ARG) returns an ml_collections.ConfigDict
--config.a.b=VALUE    override one field (parsed as the field's type; tuples as "(1, 2)")
--workdir DIR         checkpoints, logs, TensorBoard events and, at the end, DIR/model/ (a model
                      directory predict / eval.py / the converters read); rerunning resumes.

--debug               print the traceback of an error (also MOLMO_JAX_DEBUG=1)

The resolved recipe is printed at the start and saved as DIR/train_config.json.
SIGTERM / SIGINT are honoured from the moment the command starts: the run stops after the current
step with a checkpoint (or, before the first step, without running a step or saving). One run per
workdir at a time (a lock file); a resume with another model or data config is refused.
Exit status: 0 when the run finished or was stopped by SIGTERM/SIGINT after saving, 1 when the
loss became NaN/Inf (the last good checkpoint is kept), 2 for command-line errors.
"""

from __future__ import annotations

import logging
import sys

from absl import flags

from molmo_jax import config_cli, errors

FLAGS = flags.FlagValues()
CONFIG = config_cli.define_config(FLAGS)
WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, TensorBoard "
                              "events, model/; rerunning the same command resumes", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else ["train.py", *argv]
  # Installed before JAX is imported: a SIGTERM during start-up stops the run cleanly.
  with errors.DeferredInterrupt("train.py") as stop:
    try:
      config_cli.parse(argv, "train.py", __doc__, [CONFIG, WORKDIR], FLAGS)
      config_cli.require([CONFIG, WORKDIR])
    except config_cli.UsageError as e:
      print(f"error: train.py: {e}", file=sys.stderr)
      return errors.EXIT_USAGE
    from molmo_jax.training import loop
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax narrates every save at INFO
    log = logging.getLogger("molmo_jax.train")
    config = CONFIG.value
    # One line (the workdir's train_config.json has it indented).
    log.info("recipe %s, resolved: %s", FLAGS["config"].serialize().partition("=")[2] or "",
             config.to_json_best_effort(sort_keys=True))
    try:
      result = loop.train(config, WORKDIR.value, stop=stop)
    except loop.NonFiniteLossError as e:
      print(f"error: {e}", file=sys.stderr)
      return errors.EXIT_NONFINITE
  how = "stopped by signal" if result.stopped_by_signal else "finished"
  log.info("%s at step %d", how, result.step)
  return 0


def run() -> None:
  """Console entry point (`molmo-train`)."""
  sys.exit(errors.run_main(main, sys.argv[1:]))


if __name__ == "__main__":
  run()
