"""OTLP receivers (gRPC and HTTP) over one ingest path into the store's write side."""
