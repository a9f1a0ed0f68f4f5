"""pyinfra facts for nemotron-deploy: small classes with `command()` and `process()`.

Each fact also works alone (`host.get_fact(NvidiaGpus)`), but the deploy reads them all at once
through `HostSnapshot` (snapshot.py): one SSH command per host gathers every fact the deploy needs,
so a no-change re-deploy costs one round trip. No fact fails a host because a tool is absent.
"""
