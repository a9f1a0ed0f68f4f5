"""What runs on the cluster after the deploy: the scheduled health check, the rollout, the job's
readiness wait (inside the container, as ``nemotron_health.pyz``) and the GPU node check.

Standard library and this folder only (tests/unit/test_layers.py): it runs every minute on login
nodes and inside containers where nothing else of this project is installed. The deploy ships the
folder whole: as the zipapp into the job, and in the package wheel to the login node's venv.
"""
