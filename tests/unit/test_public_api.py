import tasklease


def test_public_surface_is_small() -> None:
    assert sorted(tasklease.__all__) == [
        "Client",
        "IdempotencyConflict",
        "InvalidTask",
        "LeaseLost",
        "NoTransaction",
        "PermanentError",
        "Snooze",
        "SyncClient",
        "Task",
        "TaskConflict",
        "TaskContext",
        "TaskNotFound",
        "TaskSpec",
        "TaskState",
        "Transition",
        "handler",
        "schedule",
    ]
    for name in tasklease.__all__:
        assert getattr(tasklease, name) is not None
