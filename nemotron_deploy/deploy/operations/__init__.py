"""pyinfra operations for nemotron-deploy: short generators that compare a host snapshot
(facts/snapshot.py) with the wanted state and yield commands only for what differs."""
