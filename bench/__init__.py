"""Benchmarks of nemotron-deploy against the sandbox cluster and the NeMo server emulator.

Run ``sudo .venv/bin/python -m bench --help`` (or ``sudo bench/run --help``). Each part lives in its
own module so it can be read, and re-run, on its own:

* :mod:`bench.deploy_scaling`: first and no-change deploy wall time per compute-node count, next to
  the floor (one OpenSSH round trip per host that stats and checksums every managed path), and the
  SSH commands a host receives in a no-change deploy.
* :mod:`bench.readiness`: how long after the server can generate ``health --wait`` notices, next to
  the model card's ``curl`` loop.
* :mod:`bench.check_cost`: one single health check against ``curl`` and a bare stdlib probe.
* :mod:`bench.endpoint`: the endpoint (HAProxy, the deployed config) in front of emulator processes
  on loopback: requests/s with 1 and 2 replicas, latency it adds, a replica killed under load.
* :mod:`bench.registry`: bytes the sandbox registry serves for a deploy that pulls the image.
* :mod:`bench.report`: the markdown table, the CSV files and the PNG plot.
"""
