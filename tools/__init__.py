"""Functions agents can call, registered by name in a workflow's tools.json (stdlib only).

A tool may take a `context` parameter: the runtime then passes the chat's context variables as a
dict (hidden from the model); changes the tool makes are recorded as `context.updated`.
"""
