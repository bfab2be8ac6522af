"""The research spec: its models, and the YAML it is read from (with line numbers for errors)."""
