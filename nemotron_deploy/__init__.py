"""nemotron-deploy: deploy Nemotron-4-340B-Base with NeMo on Slurm GPU clusters."""

__version__ = "0.1.0"
