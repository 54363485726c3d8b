"""What every layer shares: configuration, the request and event types, the error table, API keys, metrics."""
