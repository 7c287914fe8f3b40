"""The HTTP API (``linernotes serve``): ``pipelines.api.app.create_app``."""
