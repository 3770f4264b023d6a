"""FastAPI app that imitates Wiro's /v1 API for DreamOmni2 (run with ``--factory``)."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from wirosim.config import Fault, SimConfig
from wirosim.control import add_control_routes
from wirosim.forms import (
    BodyError,
    FormField,
    first_value,
    parse_body,
    safe_filename,
    signature_ok,
)
from wirosim.tasks import (
    CANCELABLE,
    NOT_YET_KILLABLE,
    SUCCESS_STATUS,
    TERMINAL_STATUSES,
    InputRef,
    SimState,
    Task,
    output_entry,
)

MAX_STEPS = 500


class WiroError(Exception):
    """An error answered with Wiro's error body."""

    def __init__(
        self, code: int | None, message: str, http_status: int = 200, retry_after: int | None = None
    ) -> None:
        """Remember the error's code, message, HTTP status and Retry-After."""
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        """Render as ``{"result": false, "errors": [...]}``."""
        error: dict[str, Any] = {"message": self.message}
        if self.code is not None:
            error = {"code": self.code, "message": self.message}
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(
            {"result": False, "errors": [error]}, status_code=self.http_status, headers=headers
        )

    def record(self) -> dict[str, Any]:
        """Describe the error for /_sim/runs."""
        return {"http_status": self.http_status, "code": self.code, "message": self.message}


class TruncatedResponse(Response):
    """Declares the full Content-Length, sends half the body, then gives up."""

    def __init__(self, data: bytes) -> None:
        """Keep the full payload; only half of it is ever sent."""
        super().__init__(media_type="image/png")
        self.data = data

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send headers and half the body; the server then drops the connection."""
        headers = [(b"content-type", b"image/png"), (b"content-length", b"%d" % len(self.data))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        half = self.data[: len(self.data) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})


# Messages of Wiro's error-reference.md, verbatim.
NO_TASK_YET = "There is no task yet."
NOT_CANCELLABLE = "Task is not in a cancellable state."
KEY_NOT_FOUND = "Project authorization is not founded."
SIGNATURE_REQUIRED = (
    "Project requires signature authentication. x-signature and x-nonce headers are required."
)
SIGNATURE_INVALID = "Project authorization is not valid."
CONCURRENCY_LIMIT = (
    "You have reached your concurrent task limit. With your current balance of $50.00, you "
    "can run up to 5 tasks at the same time. Add funds to increase your limit."
)


def fault_error(fault: Fault) -> WiroError:
    """The WiroError a queued fault answers with."""
    message = {
        96: CONCURRENCY_LIMIT,
        97: "Insufficient balance",
        98: "sign in to run this model",
        99: "Authorization bearer token is invalid.",
    }.get(fault.code or -1, f"Simulated HTTP {fault.http_status}")
    if fault.http_status == 401 and not fault.code:
        message = KEY_NOT_FOUND
    return WiroError(fault.code, message, fault.http_status, fault.retry_after)


def check_auth(request: Request, cfg: SimConfig) -> tuple[WiroError | None, bool | None]:
    """Validate x-api-key (and the signature when a secret is set): (error, signature_valid).

    Wiro answers every authentication failure with HTTP 401 and code 0 (error-reference.md).
    """
    headers = request.headers
    sig_valid: bool | None = None
    if cfg.api_secret:
        sig_valid = signature_ok(
            cfg.api_key, cfg.api_secret, headers.get("x-nonce"), headers.get("x-signature")
        )
    key = headers.get("x-api-key", "")
    if not hmac.compare_digest(key.encode(), cfg.api_key.encode()):
        return WiroError(0, KEY_NOT_FOUND, 401), sig_valid
    if sig_valid is False:
        if not headers.get("x-nonce") or not headers.get("x-signature"):
            return WiroError(0, SIGNATURE_REQUIRED, 401), sig_valid
        return WiroError(0, SIGNATURE_INVALID, 401), sig_valid
    return None, sig_valid


def _parse_steps(raw: str | None) -> int:
    """Parse ``steps`` (default 25), enforcing Wiro's 1..500 range."""
    if raw is None or not raw.strip():
        return 25
    try:
        number = float(raw)
    except ValueError:
        raise WiroError(0, "Request parameter [steps] must be an integer") from None
    if not number.is_integer():
        raise WiroError(0, "Request parameter [steps] must be an integer")
    if not 1 <= number <= MAX_STEPS:
        raise WiroError(0, f"Request parameter [steps] must be between 1 and {MAX_STEPS}")
    return int(number)


def _parse_scale(raw: str | None) -> str:
    """Parse ``scale`` (default 3.5); keep it as the string received."""
    if raw is None or not raw.strip():
        return "3.5"
    try:
        float(raw)
    except ValueError:
        raise WiroError(0, "Request parameter [scale] must be a number") from None
    return raw.strip()


def success_body(task: Task) -> dict[str, Any]:
    """Run's success answer."""
    return {
        "errors": [],
        "taskid": task.id,
        "socketaccesstoken": task.socketaccesstoken,
        "result": True,
    }


def task_list_body(task: Task, with_total: bool) -> dict[str, Any]:
    """Task/Detail, Kill and Cancel answers."""
    body: dict[str, Any] = {"errors": [], "tasklist": [task.to_dict()], "result": True}
    return {"total": "1", **body} if with_total else body


def add_wiro_routes(app: FastAPI, state: SimState) -> None:
    """Register Wiro's public routes: Run, Task/*, File and CDN."""

    def validate_run(owner: str, model: str, fields: list[FormField]) -> dict[str, Any]:
        """Check a Run request; return the arguments for create_task."""
        if f"{owner}/{model}".lower() != state.config.model.lower():
            raise WiroError(1, f"Model {owner}/{model} not found")
        prompt = first_value(fields, "prompt")
        if prompt is None or not prompt.strip():
            raise WiroError(0, "Request parameter [prompt] is required")
        steps = _parse_steps(first_value(fields, "steps"))
        scale = _parse_scale(first_value(fields, "scale"))
        images = [
            f for f in fields if f.name == "inputImage" and (f.is_file or (f.value or "").strip())
        ]
        if not images:
            raise WiroError(0, "Request parameter [inputImage] is required")
        callback = (first_value(fields, "callbackUrl", "callbackurl") or "").strip()
        return {
            "prompt": prompt,
            "steps": steps,
            "scale": scale,
            "images": images,
            "callbackurl": callback,
        }

    def create(args: dict[str, Any]) -> Task:
        """Store uploads and create the task."""
        inputs: list[InputRef] = []
        for item in args["images"]:
            if item.data is not None:
                url = state.store_file(
                    safe_filename(item.filename),
                    item.content_type or "application/octet-stream",
                    item.data,
                )
                inputs.append(InputRef(url=url, data=item.data))
            else:
                inputs.append(InputRef(url=(item.value or "").strip()))
        return state.create_task(
            args["prompt"], args["steps"], args["scale"], inputs, args["callbackurl"]
        )

    async def handle_run(owner: str, model: str, fields: list[FormField]) -> Task:
        """Validation, queued faults, concurrency limit, then task creation."""
        args = validate_run(owner, model, fields)
        cfg = state.config
        if cfg.run_errors:
            fault = cfg.run_errors.pop(0)
            task = create(args) if fault.create_task else None
            if fault.hang_s:
                await asyncio.sleep(fault.hang_s)
            if fault.http_status != 200 or fault.code is not None:
                raise fault_error(fault)
            if task is not None:
                return task
        if cfg.run_fail_rate and state.rng.random() < cfg.run_fail_rate:
            raise fault_error(Fault(http_status=cfg.run_fail_status))
        limit = state.config.max_concurrency
        if limit is not None and state.active_count() >= limit:
            raise WiroError(96, CONCURRENCY_LIMIT)
        return create(args)

    @app.post("/v1/Run/{owner}/{model}")
    async def run(owner: str, model: str, request: Request) -> Response:
        """Start a task."""
        state.run_calls += 1
        record: dict[str, Any] = {
            "at": time.time(),
            "path": request.url.path,
            "headers": {h: request.headers.get(h) for h in ("x-api-key", "x-nonce", "x-signature")},
            "signature_valid": None,
            "fields": [],
            "taskid": None,
            "error": None,
        }
        state.runs.append(record)
        auth_error, record["signature_valid"] = check_auth(request, state.config)
        try:
            try:
                fields = await parse_body(request)
            except BodyError as exc:
                raise WiroError(0, str(exc)) from exc
            record["fields"] = [item.record() for item in fields]
            if auth_error is not None:
                raise auth_error
            task = await handle_run(owner, model, fields)
        except WiroError as exc:
            record["error"] = exc.record()
            return exc.response()
        record["taskid"] = task.id
        return JSONResponse(success_body(task))

    async def authed_fields(request: Request) -> list[FormField]:
        """Authenticate a Task/* call and parse its body."""
        auth_error, _ = check_auth(request, state.config)
        if auth_error is not None:
            raise auth_error
        try:
            return await parse_body(request)
        except BodyError as exc:
            raise WiroError(0, str(exc)) from exc

    def lookup(fields: list[FormField], token_names: tuple[str, ...]) -> Task:
        """Find the task named by taskid or one of ``token_names``."""
        taskid = first_value(fields, "taskid")
        token = first_value(fields, *token_names)
        if not (taskid or "").strip() and not (token or "").strip():
            raise WiroError(0, "taskid or socketaccesstoken is required")
        task = state.find(taskid=taskid, token=token)
        if task is None or not state.visible(task):
            raise WiroError(1, NO_TASK_YET)
        return task

    @app.post("/v1/Task/Detail")
    async def task_detail(request: Request) -> Response:
        """Report a task by taskid or tasktoken."""
        state.detail_calls += 1
        try:
            fields = await authed_fields(request)
            cfg = state.config
            if cfg.detail_errors:
                fault = cfg.detail_errors.pop(0)
                if fault.hang_s:
                    await asyncio.sleep(fault.hang_s)
                if fault.http_status != 200 or fault.code is not None:
                    raise fault_error(fault)
            task = lookup(fields, ("tasktoken", "socketaccesstoken"))
        except WiroError as exc:
            return exc.response()
        return JSONResponse(task_list_body(task, with_total=True))

    @app.post("/v1/Task/Kill")
    async def task_kill(request: Request) -> Response:
        """Kill a task Wiro has assigned to a GPU ("any status after assign")."""
        state.kill_calls += 1
        try:
            task = lookup(await authed_fields(request), ("socketaccesstoken", "tasktoken"))
            if task.terminal:
                raise WiroError(1, "Task could not be killed: the task has already finished")
            if task.status in NOT_YET_KILLABLE:
                raise WiroError(1, "Task could not be killed: it is not assigned to a worker yet")
        except WiroError as exc:
            return exc.response()
        state.kill(task)
        return JSONResponse(task_list_body(task, with_total=False))

    @app.post("/v1/Task/Cancel")
    async def task_cancel(request: Request) -> Response:
        """Cancel a task that is still in the queue stage."""
        state.cancel_calls += 1
        try:
            task = lookup(await authed_fields(request), ("socketaccesstoken", "tasktoken"))
            if task.status not in CANCELABLE:
                raise WiroError(1, NOT_CANCELLABLE)
        except WiroError as exc:
            return exc.response()
        state.finish(task, "task_cancel")
        return JSONResponse(task_list_body(task, with_total=False))

    @app.post("/v1/Task/InputOutputDelete")
    async def task_input_output_delete(request: Request) -> Response:
        """Delete a finished task's inputs and outputs (by its socket access token)."""
        record: dict[str, Any] = {"at": time.time(), "taskid": None, "error": None}
        state.deletes.append(record)
        try:
            fields = await authed_fields(request)
            if state.config.delete_errors:
                fault = state.config.delete_errors.pop(0)
                if fault.hang_s:
                    await asyncio.sleep(fault.hang_s)
                if fault.http_status != 200 or fault.code is not None:
                    raise fault_error(fault)
            token = (first_value(fields, "tasktoken", "socketaccesstoken") or "").strip()
            if not token:
                raise WiroError(0, "Request parameter [tasktoken] is required")
            task = state.find(token=token)
            if task is None:
                raise WiroError(1, NO_TASK_YET)
            record["taskid"] = task.id
            if not task.terminal:
                raise WiroError(0, "Task is not finished yet")
        except WiroError as exc:
            record["error"] = exc.record()
            return exc.response()
        state.delete_files(task)
        return JSONResponse({"errors": [], "result": True})

    @app.websocket("/v1")
    async def socket(ws: WebSocket) -> None:
        """Wiro's websocket: register with task_info, then frames as the task goes on."""
        cfg = state.config
        if cfg.socket_refuse:
            state.sockets_refused += 1
            await ws.close(code=1008)  # before accept: the upgrade answers 403
            return
        await ws.accept()
        try:
            hello = json.loads(await ws.receive_text())
        except (WebSocketDisconnect, ValueError):
            return
        hello = hello if isinstance(hello, dict) else {}
        token = str(hello.get("tasktoken") or "")
        task = state.find(token=token) if hello.get("type") == "task_info" else None
        if task is None:
            await ws.send_json({"type": "error", "message": "task not found", "result": False})
            await ws.close()
            return
        queue = state.subscribe(token)
        sent = 0
        try:
            first = [state.frame(task, task.status)]
            if cfg.socket_lying:
                fake = output_entry(cfg.base_url, task.uuid, 202472)
                first.append(state.frame(task, SUCCESS_STATUS, [fake]))
            for frame in first:
                queue.put_nowait(frame)
            while True:
                frame = await queue.get()
                drop = state.config.socket_drop_after
                if drop is not None and sent >= drop:
                    await ws.close(code=1011)
                    return
                await ws.send_json(frame)
                sent += 1
                if frame["type"] in TERMINAL_STATUSES and not cfg.socket_lying:
                    await ws.close()
                    return
        except WebSocketDisconnect:
            return
        finally:
            state.unsubscribe(token, queue)

    @app.get("/v1/File/{token}/{filename}")
    async def input_file(token: str, filename: str) -> Response:
        """Serve an uploaded input."""
        stored = state.files.get(token)
        if stored is None:
            return Response("not found", status_code=404)
        return Response(stored.data, media_type=stored.content_type)

    @app.get("/cdn/{task_uuid}/{name}")
    async def output_file(task_uuid: str, name: str) -> Response:
        """Serve an output, misbehaving as the output_mode knob says."""
        data = state.outputs.get(task_uuid, {}).get(name)
        mode = state.config.output_mode
        redirect = state.config.output_redirect_url
        if redirect:  # every /cdn/ path: a redirect to /cdn/... loops
            return Response(status_code=302, headers={"Location": redirect})
        left = state.config.output_faulty_downloads
        if mode != "ok" and left is not None:
            if left == 0:
                mode = "ok"
            else:
                state.config = state.config.updated({"output_faulty_downloads": left - 1})
        if data is None or mode == "404":
            return Response("not found", status_code=404)
        if mode == "zeros":
            size = state.config.output_size_bytes or 1024 * 1024

            async def zeros() -> AsyncIterator[bytes]:
                left = size
                while left > 0:
                    yield bytes(min(left, 1024 * 1024))
                    left -= 1024 * 1024

            return StreamingResponse(zeros(), media_type="image/png")
        if mode == "drip":
            interval = state.config.output_stall_s

            async def drip() -> AsyncIterator[bytes]:
                for i in range(len(data)):
                    yield data[i : i + 1]
                    await asyncio.sleep(interval)

            return StreamingResponse(drip(), media_type="image/png")
        if mode == "ok":
            return Response(data, media_type="image/png")
        if mode == "truncate":
            return TruncatedResponse(data)
        half = len(data) // 2
        stall_s = state.config.output_stall_s

        async def body() -> AsyncIterator[bytes]:
            yield data[:half]
            await asyncio.sleep(stall_s)
            yield data[half:]

        return StreamingResponse(
            body(), media_type="image/png", headers={"Content-Length": str(len(data))}
        )


def create_app(config: SimConfig | None = None) -> FastAPI:
    """Build the simulator app; without ``config`` it is read from WIROSIM_* env vars."""
    state = SimState(config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        state.cancel_background()

    app = FastAPI(title="wirosim", description="Simulator of Wiro's API", lifespan=lifespan)
    app.state.sim = state
    add_wiro_routes(app, state)
    add_control_routes(app, state)
    add_sample_routes(app, os.environ.get(SAMPLES_ENV))
    return app


# A folder of images served at /samples/<file> (`dreamgate sim` names the wheel's bundled
# samples): image URLs that work offline, for the README's JSON example and for tests.
SAMPLES_ENV = "WIROSIM_SAMPLES_DIR"
SAMPLE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


def add_sample_routes(app: FastAPI, folder: str | None) -> None:
    """GET /samples/<file>: the files of ``folder`` (by name only, no subfolders)."""
    root = Path(folder).resolve() if folder else None

    @app.get("/samples/{name}")
    async def sample(name: str) -> Response:
        path = root / name if root is not None else None
        kind = SAMPLE_TYPES.get(Path(name).suffix.lower())
        if path is None or kind is None or "/" in name or not path.is_file():
            return Response("not found", status_code=404)
        return Response(path.read_bytes(), media_type=kind)
