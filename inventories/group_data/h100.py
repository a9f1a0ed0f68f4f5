"""Settings of the H100 inventory (inventories/h100.py). PLACEHOLDER values are marked."""

gpu_type = "H100-80GB-SXM"
gpus_per_node = 8
slurm_account = "my-account"  # PLACEHOLDER: your Slurm account, or None
slurm_partition = "batch"  # PLACEHOLDER: your GPU partition
model_dir = "/lustre/models/Nemotron-4-340B-Base"  # PLACEHOLDER: the checkpoint dir (model_config.yaml)
shared_dir = "/lustre/nemotron"  # PLACEHOLDER: shared filesystem seen by login and compute nodes
container_runtime = "pyxis"
container_image = "nvcr.io#nvidia/nemo:24.01.framework"  # pyxis form: '#' after the registry
ngc_api_key_env = "NGC_API_KEY"  # the key is read from this environment variable, never stored here
# The endpoint's API keys (hashes only): add one with
#   nemotron-deploy api-key new NAME --file inventories/h100.api-keys
endpoint_api_keys_file = "h100.api-keys"
