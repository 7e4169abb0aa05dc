"""Application layer: Litestar app, settings, orchestration on AG2, transport, CLI, ChatUI."""
