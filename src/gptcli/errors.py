"""The one exception type for mistakes a user can fix.

The CLI prints a `GptcliError` as a single `error: ...` line and exits with code 2;
any other exception is a bug and keeps its traceback.
"""

import signal


class GptcliError(Exception):
    """A problem with the user's input (config, data, paths, options), not a bug."""


def shorten(text: str, limit: int = 60) -> str:
    """`text` cut to its first `limit` characters and its length, so that an error line
    quoting a user's value stays one short line even when the value is megabytes."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


# sysexits.h's EX_TEMPFAIL ("try again later"): the code of a run stopped by SIGTERM or
# SIGUSR1 after saving, for a job script to requeue on (examples/slurm/train.sbatch).
REQUEUE_EXIT = 75


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint at `step`."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        super().__init__(f"stopped by signal {signum} at step {step}; saved {checkpoint}")
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        """130 for Ctrl-C (SIGINT), as shells report it: a person stopped the run. For a
        scheduler's SIGTERM or SIGUSR1, REQUEUE_EXIT: saved, run the same command again."""
        return 130 if self.signum == signal.SIGINT else REQUEUE_EXIT
