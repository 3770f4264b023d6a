"""Unauthenticated /_sim control plane for tests: knobs, records, counters."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from wirosim.tasks import SimState


def add_control_routes(app: FastAPI, state: SimState) -> None:
    """Register the /_sim routes."""

    @app.get("/_sim/config")
    async def get_config() -> dict[str, Any]:
        """Current config and knobs."""
        return state.config.model_dump()

    @app.put("/_sim/config")
    async def put_config(request: Request) -> Response:
        """Update some knobs; unknown keys or bad values answer 422."""
        try:
            patch = json.loads(await request.body() or b"{}")
        except ValueError:
            return JSONResponse({"detail": "body must be JSON"}, status_code=422)
        if not isinstance(patch, dict):
            return JSONResponse({"detail": "body must be a JSON object"}, status_code=422)
        try:
            state.config = state.config.updated(patch)
        except ValidationError as exc:
            return JSONResponse({"detail": json.loads(exc.json())}, status_code=422)
        return JSONResponse(state.config.model_dump())

    @app.post("/_sim/reset")
    async def reset() -> dict[str, Any]:
        """Forget tasks, records and counters; restore the default config."""
        state.reset()
        return {"ok": True}

    @app.get("/_sim/runs")
    async def runs() -> list[dict[str, Any]]:
        """Every Run request received, in order."""
        return state.runs

    @app.get("/_sim/tasks")
    async def tasks() -> list[dict[str, Any]]:
        """Every task object, in creation order."""
        return [task.to_dict() for task in state.tasks.values()]

    @app.get("/_sim/callbacks")
    async def callbacks() -> list[dict[str, Any]]:
        """Every callback attempt (sent or dropped), in order."""
        return state.callbacks

    @app.get("/_sim/deletes")
    async def deletes() -> list[dict[str, Any]]:
        """Every Task/InputOutputDelete call, in order (taskid, error)."""
        return state.deletes

    @app.get("/_sim/stats")
    async def stats() -> dict[str, Any]:
        """Counters."""
        return state.stats()
