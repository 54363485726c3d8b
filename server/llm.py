"""The Python API's public path: `from adapterd.server.llm import LLM` (it lives in the host tier,
`host/llm.py`, next to the `Service` that wraps it for the servers)."""

from adapterd.server.host.llm import LLM, PreparedRequest, RequestHandle

__all__ = ["LLM", "PreparedRequest", "RequestHandle"]
