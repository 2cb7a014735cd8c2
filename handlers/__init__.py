"""Built-in handlers, one module per action. Every module here is loaded by workers and the API."""
