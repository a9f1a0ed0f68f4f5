"""A100 80GB cluster: NVIDIA's footprint for Nemotron-4-340B-Base is 2 nodes x 8 GPUs (TP 8, PP 2).

PLACEHOLDERS: the host names are examples. Replace them with your cluster's names, or keep them and
add ("name", {"ssh_hostname": "10.0.0.5"}). Settings for this inventory: group_data/a100.py.
"""

login = ["login01.a100.example.internal"]  # PLACEHOLDER: where sbatch runs

compute = [  # PLACEHOLDER: the GPU nodes Slurm allocates from
    "gpu-a100-001.example.internal",
    "gpu-a100-002.example.internal",
]
