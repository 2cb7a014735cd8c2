"""`email_user`: the original quick start's example.

It validates the payload and records the message it would send (in its result
and the log); there is no mail server. The message id is derived from the task,
so a retried attempt "sends" the same message: how a real provider call would be
made idempotent.
"""

from typing import Annotated

import msgspec

from tasklease import TaskContext, handler


class EmailUser(msgspec.Struct):
    user_id: Annotated[int, msgspec.Meta(gt=0)]
    template: str = "welcome"
    action: str = "email_user"


@handler("email_user", lease_seconds=30, max_attempts=5)
async def email_user(ctx: TaskContext, payload: EmailUser) -> dict[str, object]:
    message_id = f"<{ctx.idempotency_key or f'task-{ctx.task_id}'}@tasklease.invalid>"
    ctx.logger.info(
        "sent %r e-mail to user %d as %s", payload.template, payload.user_id, message_id
    )
    return {
        "status": "sent",
        "user_id": payload.user_id,
        "template": payload.template,
        "message_id": message_id,
    }
