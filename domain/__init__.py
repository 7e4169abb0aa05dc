"""Domain layer: event types, the stored record, the event store and workflow manifests."""
