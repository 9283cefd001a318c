"""``POST /v1/images/generations`` and the generated files it links to."""

from __future__ import annotations

import asyncio
import base64
import time

from litestar import Controller, Request, get, post
from litestar.exceptions import HTTPException
from litestar.params import FromPath, JSONBody
from litestar.response import File

from nexa.server import convert
from nexa.server import schemas as wire
from nexa.server.deps import Config, Images, Manager
from nexa.server.errors import GUARDED, INFERENCE, error_responses
from nexa.server.work import run_on_model
from nexa.types import Task


class ImagesController(Controller):
    path = "/v1/images"
    tags = ["images"]

    @post("/generations", status_code=200, summary="Create images from a prompt", responses=error_responses(*INFERENCE))
    async def create(
        self,
        data: JSONBody[wire.ImageGenerationRequest],
        request: Request,
        manager: Manager,
        config: Config,
        images: Images,
    ) -> wire.ImagesResponse:
        spec = convert.image_request(data, config)
        result = await run_on_model(
            request, manager, config, data.model, Task.IMAGE, lambda backend: backend.run_images(spec),
            keep_alive=convert.keep_alive_seconds(data.keep_alive),
        )
        out = []
        for png in result.images:
            if data.response_format == "b64_json":
                out.append(wire.ImageData(b64_json=base64.b64encode(png).decode("ascii")))
            else:
                name = await asyncio.to_thread(images.save, png)
                url = request.url.with_replacements(path=f"/v1/images/files/{name}", query="")
                out.append(wire.ImageData(url=str(url)))
        return wire.ImagesResponse(created=int(time.time()), data=out)

    @get("/files/{name:str}", summary="Fetch a generated image", responses=error_responses(400, 404, *GUARDED))
    async def file(self, name: FromPath[str], images: Images) -> File:
        path = images.path(name)
        if path is None:
            raise HTTPException(status_code=404, detail="image not found or expired")
        return File(path, media_type="image/png", filename=name, content_disposition_type="inline")
