"""Python functions agents can call, registered by name in a workflow's tools.json."""
