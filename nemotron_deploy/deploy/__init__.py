"""What runs at deploy time, on the operator's machine inside pyinfra: the steps that
``deploys/nemotron.py`` lists, what each host should have, the one read and the checks per host,
the rendered files and their templates, pyinfra's facts and operations.

Imports the model (settings, inventory, planner, catalog) and the service side's knowledge (Slurm,
the endpoint's slot names); nothing imports it but the command line and the deploy file.
"""
