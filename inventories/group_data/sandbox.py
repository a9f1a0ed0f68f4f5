"""Settings of the local sandbox cluster (inventories/sandbox.py; `nemotron-deploy sandbox up`).

Its fake GPUs answer nvidia-smi from a real H200 capture. It runs the model card's 2-node layout
(TP 8 x PP 2 on 2 x 8 GPUs) instead of the 1-node H200 plan, so multi-node jobs are exercised. NeMo is
"installed on the host" (the protocol emulator stands in for megatron_gpt_eval.py), and every compute
node also pulls the image from the sandbox registry with podman, so the pull path runs for real.
"""

gpu_type = "H200-141GB"
gpus_per_node = 8
tensor_parallel = 8
pipeline_parallel = 2
slurm_partition = "gpu"
slurm_exclusive = False
slurm_time_limit = "01:00:00"
model_dir = "/var/lib/nemotron-sandbox/shared/models/Nemotron-4-340B-Base"
shared_dir = "/var/lib/nemotron-sandbox/shared"
container_runtime = "host"
pull_runtime = "podman"
container_image = "10.213.0.2:5000/nvidia/nemo:24.01.framework"
registry_tls_verify = False
min_free_gib = 1
health_startup_budget_seconds = 300
