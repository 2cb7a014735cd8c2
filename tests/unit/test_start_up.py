"""The service processes hand what start-up made to gc.freeze() (engine/cli/main.py)."""

from __future__ import annotations

import gc

from tasklease.engine.cli.main import freeze_start_up


def test_start_up_objects_are_frozen_out_of_the_collectors_sight() -> None:
    gc.unfreeze()
    made_at_start_up = object.__new__(type("StartUp", (), {}))
    try:
        freeze_start_up()
        assert gc.get_freeze_count() > 1000
        # a frozen object is in no generation the collector walks
        assert not any(o is made_at_start_up for o in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(o is made_at_start_up for o in gc.get_objects())
