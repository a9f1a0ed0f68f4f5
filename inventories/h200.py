"""H200 141GB cluster: NVIDIA's footprint for Nemotron-4-340B-Base is 1 node x 8 GPUs (TP 8, PP 1).

PLACEHOLDERS: the host names are examples. Replace them with your cluster's names, or keep them and
add ("name", {"ssh_hostname": "10.0.0.5"}). Settings for this inventory: group_data/h200.py.
"""

login = ["login01.h200.example.internal"]  # PLACEHOLDER: where sbatch runs

compute = [  # PLACEHOLDER: the GPU nodes Slurm allocates from
    "gpu-h200-001.example.internal",
]
