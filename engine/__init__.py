"""The engine: the state machine, the guarded SQL transitions, the worker and the CLI.

User code imports the public surface from `tasklease`, not from here.
"""
