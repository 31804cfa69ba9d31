"""What the ``wait()`` helpers share: the polling schedule, the progress bars and the final verdict."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from ragadapt_client.errors import JobFailedError, RunCancelledError, RunFailedError, WaitTimeoutError
from ragadapt_client.models import JobInfo, RunInfo


class PollSchedule:
    """Polls quickly while things change and backs off (x1.5 up to ``maximum``) while they do not."""

    def __init__(self, initial: float, maximum: float, timeout: float | None, what: str) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("need 0 < poll_interval <= max_poll_interval")
        self.initial = initial
        self.maximum = maximum
        self.interval = initial
        self.what = what
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def next_delay(self, changed: bool) -> float:
        """Seconds to sleep before the next poll; raises ``WaitTimeoutError`` once the deadline passed."""
        self.interval = self.initial if changed else min(self.maximum, self.interval * 1.5)
        if self.deadline is None:
            return self.interval
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeoutError(
                f"gave up waiting for {self.what} after {self.timeout:g}s; it goes on", code="wait_timeout"
            )
        return min(self.interval, left)


class RunProgress:
    """A tqdm bar of training steps; the postfix shows the state and the latest step's metrics."""

    def __init__(self, run: RunInfo, enabled: bool) -> None:
        self._bar = None
        if enabled:
            self._bar = tqdm(
                total=run.total_steps, unit="step", desc=f"run {run.id} ({run.domain})", dynamic_ncols=True
            )
        self.update(run)

    def update(self, run: RunInfo) -> None:
        if self._bar is None:
            return
        if run.total_steps is not None and self._bar.total != run.total_steps:
            self._bar.total = run.total_steps
        self._bar.n = run.step
        postfix = {"state": run.state}
        for name in ("loss", "lr", "examples_per_s"):
            value = getattr(run.latest, name)
            if value is not None:
                postfix[name] = f"{value:.3g}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class JobProgress:
    """A tqdm bar of a job's progress in percent."""

    def __init__(self, job: JobInfo, enabled: bool) -> None:
        self._bar = None
        if enabled:
            self._bar = tqdm(
                total=100,
                unit="%",
                desc=f"{job.kind} {job.domain}",
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt}% [{elapsed}<{remaining}{postfix}]",
            )
        self.update(job)

    def update(self, job: JobInfo) -> None:
        if self._bar is None:
            return
        self._bar.n = round(100 * job.progress, 1)
        self._bar.set_postfix({"state": job.state}, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_outcome(run: RunInfo) -> RunInfo:
    """The finished run, or the typed error if it failed or was cancelled."""
    if run.state == "failed":
        raise RunFailedError(run)
    if run.state == "cancelled":
        raise RunCancelledError(run)
    return run


def job_outcome(job: JobInfo) -> JobInfo:
    """The finished job, or ``JobFailedError`` if it failed or was cancelled."""
    if job.state in ("failed", "cancelled"):
        raise JobFailedError(job)
    return job
