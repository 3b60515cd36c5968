"""ctxaudit: find where distributed-tracing context is lost, and what the loss costs."""

__version__ = "0.1.0"
