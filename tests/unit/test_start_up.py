"""The service processes hand what start-up made to gc.freeze() and collect young objects
less often (engine/cli/main.py)."""

from __future__ import annotations

import gc

from tasklease.engine.cli.main import YOUNG_COLLECTION_AFTER, freeze_start_up


def test_start_up_objects_are_frozen_out_of_the_collectors_sight() -> None:
    gc.unfreeze()
    made_at_start_up = object.__new__(type("StartUp", (), {}))
    thresholds = gc.get_threshold()
    try:
        freeze_start_up()
        assert gc.get_freeze_count() > 1000
        # a frozen object is in no generation the collector walks
        assert not any(o is made_at_start_up for o in gc.get_objects())
        # young passes wait for many more objects than CPython's 700; the older ones keep
        # their default
        assert gc.get_threshold() == (YOUNG_COLLECTION_AFTER, *thresholds[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    assert any(o is made_at_start_up for o in gc.get_objects())
