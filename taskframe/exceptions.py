"""Every error taskframe raises, under one root.

::

    TaskframeError
    ├── ConfigurationError (ValueError)   bad setting, bad URL, unknown scheme, missing extra
    ├── NotRegistered (KeyError)          a message names a task this process does not know
    ├── MessageError (ValueError)         a message that cannot be decoded or fails the schema
    ├── BrokerError                       the broker refused or failed an operation
    │   ├── BrokerConnectionError         the broker is unreachable (retryable)
    │   └── MessageTooLarge               the message is over the broker's size limit
    ├── BackendError                      the result backend failed an operation
    ├── TimeoutError (builtins.TimeoutError)  AsyncResult.get() waited longer than its timeout
    ├── TaskError                         a task failed remotely; its class could not be rebuilt
    ├── ChordError                        a chord's header task failed
    ├── TaskRevokedError                  the task was revoked or expired before it ran
    ├── TimeLimitExceeded                 the hard time limit killed the task
    ├── DeliveryLimitExceeded             delivered max_deliveries times without an ack; dead-lettered
    ├── SoftTimeLimitExceeded             raised inside the task at its soft time limit
    ├── Retry                             raised by ``self.retry()``: the task is scheduled again
    └── MaxRetriesExceededError           ``self.retry()`` with no exception once retries ran out
"""

from __future__ import annotations

import builtins


class TaskframeError(Exception):
    """Root of every taskframe error."""


class ConfigurationError(TaskframeError, ValueError):
    """A setting, URL or installation problem the user must fix before anything can run."""


class NotRegistered(TaskframeError, KeyError):
    """A task name that no ``@app.task`` registered in this process."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "task not registered"


class MessageError(TaskframeError, ValueError):
    """A message that cannot be decoded, or that does not fit the protocol."""


class BrokerError(TaskframeError):
    """The broker failed an operation."""


class BrokerConnectionError(BrokerError):
    """The broker cannot be reached; the operation may succeed when retried."""


class MessageTooLarge(BrokerError):
    """The encoded message is larger than the broker accepts."""

    def __init__(self, size: int, limit: int, broker: str) -> None:
        self.size = size
        self.limit = limit
        msg = (
            f"message of {size} bytes is over the {broker} limit of {limit} bytes; "
            "pass a reference (a URL or a key) instead of the data itself"
        )
        super().__init__(msg)


class BackendError(TaskframeError):
    """The result backend failed an operation."""


class TimeoutError(TaskframeError, builtins.TimeoutError):
    """``AsyncResult.get()`` gave up waiting."""


class TaskError(TaskframeError):
    """A task failed and its exception class could not be rebuilt here.

    Attributes:
        exc_type: the remote exception's qualified name, e.g. ``"myapp.errors.Boom"``.
        exc_message: the remote exception's message.
        traceback: the remote traceback, as text.
    """

    def __init__(self, exc_type: str, exc_message: str, traceback: str | None = None) -> None:
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.traceback = traceback
        super().__init__(f"{exc_type}: {exc_message}")

    def __reduce__(self) -> tuple[type[TaskError], tuple[str, str, str | None]]:
        return (type(self), (self.exc_type, self.exc_message, self.traceback))


class ChordError(TaskframeError):
    """A task in a chord's header failed, so the chord's body did not run; the message
    names the failed task and its exception."""


class TaskRevokedError(TaskframeError):
    """The task was revoked (or expired) and did not run."""


class TimeLimitExceeded(TaskframeError):
    """The task ran past its hard time limit and was stopped."""


class DeliveryLimitExceeded(TaskframeError):
    """The task's message was delivered ``max_deliveries`` times without an ack (the task
    probably crashed its worker each time) and went to the dead letters instead of running
    again; ``taskframe dead requeue`` runs it again once the cause is fixed."""


class SoftTimeLimitExceeded(TaskframeError):
    """Raised inside a task when it reaches its soft time limit; the task may clean up."""


class Retry(TaskframeError):
    """Raised by ``Task.retry()``: the message was scheduled again; this attempt ends here."""

    def __init__(self, message: str = "", exc: BaseException | None = None, when: float | None = None) -> None:
        self.exc = exc
        self.when = when
        super().__init__(message or f"retry in {when}s")


class MaxRetriesExceededError(TaskframeError):
    """``self.retry()`` was called without an exception after the last allowed retry."""
