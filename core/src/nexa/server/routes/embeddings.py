"""``POST /v1/embeddings``: vectors for texts or token arrays, as floats or base64."""

from __future__ import annotations

from litestar import Controller, Request, post
from litestar.params import JSONBody

from nexa.errors import NexaError
from nexa.server import convert
from nexa.server import schemas as wire
from nexa.server.deps import Config, Manager
from nexa.server.errors import INFERENCE, error_responses
from nexa.server.work import run_on_model
from nexa.types import Task


class EmbeddingsController(Controller):
    path = "/v1/embeddings"
    tags = ["embeddings"]

    @post(status_code=200, summary="Create embeddings", responses=error_responses(*INFERENCE))
    async def create(
        self, data: JSONBody[wire.EmbeddingRequest], request: Request, manager: Manager, config: Config
    ) -> wire.EmbeddingResponse:
        embed = convert.embed_request(data, config)
        result = await run_on_model(
            request, manager, config, data.model, Task.EMBED, lambda backend: backend.run_embed(embed),
            keep_alive=convert.keep_alive_seconds(data.keep_alive),
        )
        if len(result.vectors) != len(embed.inputs):
            raise NexaError("the backend returned a wrong number of vectors")
        items = [
            wire.EmbeddingData(
                index=index,
                embedding=convert.encode_vector(convert.shape_vector(vector, data.dimensions), data.encoding_format),
            )
            for index, vector in enumerate(result.vectors)
        ]
        return wire.EmbeddingResponse(
            data=items,
            model=data.model,
            usage=wire.EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
        )
