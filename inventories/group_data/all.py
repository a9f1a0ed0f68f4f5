"""Defaults for every inventory (pyinfra group `all`). Per-inventory values: group_data/<inventory>.py.

Every setting is documented: `nemotron-deploy settings` lists each one with its type, default and
what it is for (from nemotron_deploy/settings.py, ClusterSettings; `--json` for tools).
`nemotron-deploy validate inventories/*.py` checks them all. Only site-wide choices belong here.
"""

model = "nemotron-4-340b"
port = 1424  # the model card's port
job_name = "nemotron-340b"
mode = "serve"  # serve: keep serving; smoke: one call_server.py call, then end the job
slurm_time_limit = "04:00:00"
