"""vLLM's tokenizer routes: POST /tokenize, POST /detokenize, GET /tokenizer_info.

`model` names the adapter (or the base model): a soft prompt adds no tokens to the text, but its virtual
tokens count toward the context, so `max_model_len` is what is left for prompt and output.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from adapterd.server.common.errors import InvalidRequest
from adapterd.server.common.protocol import GenerateRequest
from adapterd.server.host.service import Service
from adapterd.server.wire.params import field, is_token_id, json_body, messages_field


class TokenizeRoutes:
    def __init__(self, service: Service, principal: Any) -> None:
        self.service = service
        self.principal = principal

    async def tokenize(self, http: Request) -> Response:
        body = await json_body(http)
        adapter_id = field(body, "model", str) or None
        if "messages" in body:
            request = GenerateRequest(messages=messages_field(body["messages"]), adapter_id=adapter_id)
        else:
            request = GenerateRequest(prompt=self._prompt(body), adapter_id=adapter_id)
        add_special = field(body, "add_special_tokens", bool, True)
        ids, limit = await self.service.tokenize(request, self.principal(http), add_special)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": limit, "tokens": ids, "token_strs": None}
        if field(body, "return_token_strs", bool, False):
            out["token_strs"] = [self.service.token_text(i) for i in ids]
        return JSONResponse(out)

    async def detokenize(self, http: Request) -> Response:
        body = await json_body(http)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(is_token_id(t) for t in tokens):
            raise InvalidRequest("tokens must be a list of token ids", param="tokens")
        return JSONResponse({"prompt": self.service.detokenize(tokens)})

    async def tokenizer_info(self, http: Request) -> Response:
        self.principal(http)
        return JSONResponse(self.service.tokenizer_info())

    @staticmethod
    def _prompt(body: dict[str, Any]) -> str:
        prompt = field(body, "prompt", str)
        if prompt is None:
            raise InvalidRequest("prompt (a string) or messages is required", param="prompt")
        return prompt
