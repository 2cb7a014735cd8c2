"""tasklease: a durable task scheduler on PostgreSQL.

The public surface for handler authors is small on purpose:

    from engine import handler, TaskContext, PermanentError
"""

from engine.registry import PermanentError, TaskContext, handler
from engine.states import TaskState

__all__ = ["PermanentError", "TaskContext", "TaskState", "handler"]
