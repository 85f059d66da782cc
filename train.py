"""Entry point for launchers: ``deepspeed train.py --deepspeed ds_configs/zero3.json [--config X.yaml] [--set k=v]``.

Also runs under torchrun, mpirun and srun, or as plain ``python train.py`` (one process).
With no --config it runs the built-in default pipeline on a tiny model and the bundled data.
"""
import argparse
import sys

from autoregembed.tools.cli import _add_run_args, run_training

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    _add_run_args(parser)
    sys.exit(run_training(parser.parse_args()))
