"""Plans are requests: one pydantic config per action, readable and writable as YAML/JSON, and the selection logic."""
