"""The rehearsal: everything that stands in for a real GPU cluster, and never ships to one.

- `sandbox/`: a login node and N GPU compute nodes in Linux namespaces on this machine (real sshd,
  Slurm, registry), with a fake `nvidia-smi` answering from real captures;
- `emulator.py`: a protocol-exact stand-in for NeMo's `megatron_gpt_eval.py` server.

Installed by `scripts/setup` next to the product (`nemotron_deploy`), as its own distribution, so the
wheel the deploy installs on a cluster carries none of it.
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
EMULATOR = PACKAGE_DIR / "emulator.py"
# What `nvidia-smi` printed on a real 2 x H200 host: the fake nvidia-smi's answers and the parsers' tests.
NVIDIA_SMI_CAPTURES = PACKAGE_DIR / "sandbox" / "nvidia_smi_captures" / "h200-x2"
MODEL_CONFIG = PACKAGE_DIR / "sandbox" / "model_config.yaml"
