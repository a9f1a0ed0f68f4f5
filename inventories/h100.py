"""H100 80GB SXM cluster: NVIDIA's footprint for Nemotron-4-340B-Base is 2 nodes x 8 GPUs (TP 8, PP 2).

PLACEHOLDERS: the host names are examples. Replace them with your cluster's names, or keep them and
add ("name", {"ssh_hostname": "10.0.0.5"}). Settings for this inventory: group_data/h100.py.
"""

login = ["login01.h100.example.internal"]  # PLACEHOLDER: where sbatch runs

compute = [  # PLACEHOLDER: the GPU nodes Slurm allocates from
    "gpu-h100-001.example.internal",
    "gpu-h100-002.example.internal",
]
