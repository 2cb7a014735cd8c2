"""tasklease: a durable task scheduler on PostgreSQL.

The public surface for handler authors is small on purpose:

    from engine import handler, TaskContext, PermanentError, Snooze, schedule
"""

from engine.registry import PermanentError, Snooze, TaskContext, handler
from engine.schedules import schedule
from engine.states import TaskState

__all__ = ["PermanentError", "Snooze", "TaskContext", "TaskState", "handler", "schedule"]
