"""The HTTP side: the Litestar app and its lifespans, REST controllers, the WebSocket transport and auth."""
