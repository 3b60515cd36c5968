"""The Streamlit explorer. Built by the investigation-UI issue; reads only through the
store's reader interface (see the import contracts in pyproject.toml)."""
