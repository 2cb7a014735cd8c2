import engine


def test_public_surface_is_small() -> None:
    assert sorted(engine.__all__) == [
        "PermanentError",
        "Snooze",
        "TaskContext",
        "TaskState",
        "handler",
        "schedule",
    ]
    for name in engine.__all__:
        assert getattr(engine, name) is not None
