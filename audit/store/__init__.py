"""The DuckDB span store: migrations, the one writer, read-only readers, error translation."""
