"""/v1/models (OpenAI list format, plus each model's task and device) and /health."""

from __future__ import annotations

from dataclasses import asdict

from aiohttp import web

from model_server.registry import LoadedModel
from model_server.state import state_of

OWNER = "joulegate-model-server"


def _model_entry(model: LoadedModel) -> dict[str, object]:
    return {
        "id": model.name,
        "object": "model",
        "created": model.created,
        "owned_by": OWNER,
        "task": model.task,
        "device": model.device,
    }


async def list_models(request: web.Request) -> web.Response:
    models = state_of(request).models
    return web.json_response({"object": "list", "data": [_model_entry(m) for m in models]})


async def get_model(request: web.Request) -> web.Response:
    model = state_of(request).models.find(request.match_info["model"])
    return web.json_response(_model_entry(model))


async def health(request: web.Request) -> web.Response:
    """Liveness plus queue state: enough for a load balancer and for joulegate's demo."""
    state = state_of(request)
    return web.json_response(
        {
            "status": "ok",
            "models": len(state.models),
            "devices": [asdict(d) for d in state.pool.devices()],
            "stats": asdict(state.pool.stats()),
        }
    )
