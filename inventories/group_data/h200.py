"""Settings of the H200 inventory (inventories/h200.py). PLACEHOLDER values are marked."""

gpu_type = "H200-141GB"
gpus_per_node = 8
slurm_account = "my-account"  # PLACEHOLDER: your Slurm account, or None
slurm_partition = "batch"  # PLACEHOLDER: your GPU partition
model_dir = "/lustre/models/Nemotron-4-340B-Base"  # PLACEHOLDER: the checkpoint dir (model_config.yaml)
shared_dir = "/lustre/nemotron"  # PLACEHOLDER: shared filesystem seen by login and compute nodes
container_runtime = "pyxis"
container_image = "nvcr.io#nvidia/nemo:24.01.framework"  # pyxis form: '#' after the registry
ngc_api_key_env = "NGC_API_KEY"  # the key is read from this environment variable, never stored here
extra_sbatch_options = ["--qos=inference"]  # PLACEHOLDER: any extra #SBATCH lines your site needs
# The endpoint's API keys (hashes only): add one with
#   nemotron-deploy api-key new NAME --file inventories/h200.api-keys
endpoint_api_keys_file = "h200.api-keys"
