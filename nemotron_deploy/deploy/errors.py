"""The one error a deploy step raises to stop the run, before any host is changed."""

from pyinfra.api.exceptions import PyinfraError


class DeployError(PyinfraError):
    """Stops the deploy before any change; the message says what is wrong and what to change."""
