"""The host tier: the async `Service` both front ends call, the adapter registry, grammars and tool calls."""
