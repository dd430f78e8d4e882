"""Exit codes, and the error a command raises to end with one of them.

Scripts branch on the exit code, so each code is a kind of failure a caller
can act on; ``main`` turns every other exception into one of these.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 1
"""Bad input, an unknown task, or a request the orchestrator refused."""
EXIT_USAGE = 2
"""The command line itself is wrong: unknown command or option, missing argument."""
EXIT_UNREACHABLE = 3
"""The broker cannot be reached, or no orchestrator answers on its request queue."""
EXIT_TASK_DID_NOT_COMPLETE = 4
"""``submit --wait``: the task ended failed, timeout or cancelled."""
EXIT_WAIT_TIMED_OUT = 5
"""``submit --wait --wait-timeout``: the task had not ended in time (it goes on)."""

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 bad input, unknown task id, or a request the orchestrator"
    " refused; 2 usage error; 3 broker unreachable or no orchestrator answering;"
    " 4 submit --wait: the task ended failed, timeout or cancelled; 5 submit --wait:"
    " it had not ended within --wait-timeout (it was not cancelled); 130 and 143: SIGINT"
    " and SIGTERM ended a command before it was done."
)


class CliError(Exception):
    """An error to print as one line, with the exit code it gives."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code
