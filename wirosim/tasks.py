"""Task store, task lifecycle and callback delivery."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import ssl
import string
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image

from wirosim.config import FailMode, SimConfig
from wirosim.images import decode_image, pad_png, render_output

logger = logging.getLogger("wirosim")

# The lifecycle in the order of Wiro's docs (tasks.md), up to the last running status.
RUNNING_STATUSES: tuple[str, ...] = (
    "task_queue",
    "task_accept",
    "task_preprocess_start",
    "task_preprocess_end",
    "task_assign",
    "task_start",
    "task_output",
    "task_output_full",
    "task_end",
    "task_postprocess_start",
)
# Interim stderr events (tasks.md: "not a final failure").
INTERIM_STATUSES: tuple[str, ...] = ("task_error", "task_error_full")
SUCCESS_STATUS = "task_postprocess_end"
# Both successful and failed tasks end in task_postprocess_end (judged by pexit); a
# cancelled or killed one in task_cancel. Nothing else ends a task.
TERMINAL_STATUSES = frozenset({SUCCESS_STATUS, "task_cancel"})
# Cancel works only while queued; Kill "any status after assign" (tasks.md).
CANCELABLE = frozenset({"task_queue"})
NOT_YET_KILLABLE = frozenset(
    {"task_queue", "task_accept", "task_preprocess_start", "task_preprocess_end"}
)
STDERR_WARNING = (
    "/opt/conda/lib/python3.10/site-packages/torch/nn/modules/conv.py:456: UserWarning: "
    "Plan failed with a cudnnException (Triggered internally at ../aten/src/ATen/native/"
    "cudnn/Conv_v8.cpp:919.)\n"
)
TIME_FIELDS: dict[str, str] = {
    "task_queue": "createtime",
    "task_accept": "accepttime",
    "task_assign": "assigntime",
    "task_preprocess_start": "preprocessstarttime",
    "task_preprocess_end": "preprocessendtime",
    "task_start": "starttime",
    "task_end": "endtime",
    "task_postprocess_start": "postprocessstarttime",
    "task_postprocess_end": "postprocessendtime",
    "task_cancel": "canceltime",
}
ALL_TIME_FIELDS = tuple(dict.fromkeys(TIME_FIELDS.values()))
CPS = "0.000585000000"
SUCCESS_COST = "0.003500000000"
CATEGORIES = json.dumps(
    ["persistent", "h100", "checkpoint-folder", "image-to-image", "model", "image-editing"],
    separators=(",", ":"),
)
FETCH_TIMEOUT_S = 10.0
CALLBACK_TIMEOUT_S = 10.0
OUTPUT_NAME = "0.png"


def random_token(length: int = 30) -> str:
    """Random alphanumeric token like Wiro's socketaccesstoken."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


@dataclass
class StoredFile:
    """An uploaded input file, served at /v1/File/{token}/{filename}."""

    filename: str
    content_type: str
    data: bytes


@dataclass
class InputRef:
    """One inputImage value: its public URL and, for uploads, its bytes."""

    url: str
    data: bytes | None = None


@dataclass
class Task:
    """A simulated Wiro task."""

    id: str
    socketaccesstoken: str
    prompt: str
    steps: int
    scale: str
    inputs: list[InputRef]
    callbackurl: str
    base_url: str
    fail_mode: FailMode
    duration_s: float
    output_size_bytes: int | None
    queue_hold_s: float = 0.0
    interim_task_error: bool = False
    extra_status: str | None = None
    created: float = field(default_factory=time.time)
    killing: bool = False
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    status: str = "task_queue"
    times: dict[str, float] = field(default_factory=dict)
    debugerror: str = ""
    pexit: str = ""
    totalcost: str = "0"
    outputs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        """True once the task reached a final status."""
        return self.status in TERMINAL_STATUSES

    def set_status(self, status: str) -> None:
        """Move to ``status`` and stamp the matching timestamp."""
        self.status = status
        time_field = TIME_FIELDS.get(status)
        if time_field is not None:
            self.times[time_field] = time.time()

    def parameters(self) -> dict[str, Any]:
        """The Run parameters as Wiro echoes them."""
        urls = [ref.url for ref in self.inputs]
        return {
            "inputImage": urls[0] if len(urls) == 1 else urls,
            "prompt": self.prompt,
            "steps": str(self.steps),
            "scale": self.scale,
        }

    def to_dict(self) -> dict[str, Any]:
        """The task object exactly as Task/Detail returns it."""
        stamps = {name: str(int(self.times.get(name, 0))) for name in ALL_TIME_FIELDS}
        start = self.times.get("starttime")
        end = self.times.get("endtime") or self.times.get("canceltime")
        elapsed = max(0.0, end - start) if start is not None and end is not None else 0.0
        size = sum(int(out["size"]) for out in self.outputs)
        return {
            "id": self.id,
            "uuid": self.uuid,
            "name": "",
            "socketaccesstoken": self.socketaccesstoken,
            "parameters": self.parameters(),
            "debugoutput": "",
            "debugerror": self.debugerror,
            "starttime": stamps["starttime"],
            "endtime": stamps["endtime"],
            "elapsedseconds": f"{elapsed:.4f}",
            "status": self.status,
            "cps": CPS,
            "totalcost": self.totalcost,
            "guestid": None,
            "projectid": "699",
            "modelid": "598",
            "description": "",
            "basemodelid": "0",
            "runtype": "model",
            "modelfolderid": "",
            "modelfileid": "",
            "callbackurl": self.callbackurl,
            "marketplaceid": None,
            "createtime": stamps["createtime"],
            "canceltime": stamps["canceltime"],
            "assigntime": stamps["assigntime"],
            "accepttime": stamps["accepttime"],
            "preprocessstarttime": stamps["preprocessstarttime"],
            "preprocessendtime": stamps["preprocessendtime"],
            "postprocessstarttime": stamps["postprocessstarttime"],
            "postprocessendtime": stamps["postprocessendtime"],
            "pexit": self.pexit,
            "categories": CATEGORIES,
            "outputs": [dict(out) for out in self.outputs],
            "size": str(size),
        }


def output_entry(base_url: str, task_uuid: str, size: int) -> dict[str, Any]:
    """Build one entry of a task's ``outputs`` list."""
    now = str(int(time.time()))
    return {
        "id": uuid.uuid4().hex,
        "name": OUTPUT_NAME,
        "contenttype": "image/png",
        "parentid": uuid.uuid4().hex,
        "uuid": task_uuid,
        "size": str(size),
        "addedtime": now,
        "modifiedtime": now,
        "accesskey": random_token(),
        "foldercount": "0",
        "filecount": "0",
        "ispublic": 0,
        "expiretime": None,
        "url": f"{base_url}/cdn/{task_uuid}/{OUTPUT_NAME}",
    }


class TaskFailed(Exception):
    """Raised inside the lifecycle to end a task as Wiro ends failed ones: pexit "1"."""


class SimState:
    """All mutable simulator state; lives on the server's event loop."""

    def __init__(self, config: SimConfig | None = None) -> None:
        """Create the state; ``config`` (or the environment) gives the defaults."""
        self._explicit_config = config
        self.config = self._default_config()
        self._next_id = 100000
        self._background: set[asyncio.Task[None]] = set()
        self._task_jobs: dict[str, asyncio.Task[None]] = {}
        self._rng = random.Random()
        self.rng = self._rng  # shared with the Run handler's fault rates
        # One TLS context for every client: httpx builds a default one (loading the CA
        # bundle, ~30 ms of CPU) per client otherwise, and a client is made per task.
        self._tls = ssl.create_default_context()
        self._clear()

    def _clear(self) -> None:
        """Forget tasks, files, outputs, records and counters."""
        self.tasks: dict[str, Task] = {}
        self.files: dict[str, StoredFile] = {}
        self.outputs: dict[str, dict[str, bytes]] = {}
        self.runs: list[dict[str, Any]] = []
        self.callbacks: list[dict[str, Any]] = []
        # Every Task/InputOutputDelete call: taskid (or None), error (or None).
        self.deletes: list[dict[str, Any]] = []
        self.tasks_by_callback: dict[str, int] = {}
        # Websocket subscribers by task token: each a queue of frames to send.
        self.subscribers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self.sockets_opened = 0
        self.sockets_refused = 0
        self.peak_concurrency = 0
        self.callbacks_sent = 0
        self.callbacks_dropped = 0
        self.detail_calls = 0
        self.run_calls = 0
        self.kill_calls = 0
        self.cancel_calls = 0

    def reset(self) -> None:
        """Cancel background work, clear everything, restore the default config."""
        self.cancel_background()
        self.config = self._default_config()
        self._clear()

    def _default_config(self) -> SimConfig:
        """A fresh copy of the config given at creation, or one read from the environment."""
        if self._explicit_config is not None:
            return self._explicit_config.model_copy(deep=True)
        return SimConfig.from_env()

    def cancel_background(self) -> None:
        """Cancel every lifecycle and callback coroutine still running."""
        for job in list(self._background):
            job.cancel()
        self._background.clear()
        self._task_jobs.clear()

    def stats(self) -> dict[str, Any]:
        """Counters for /_sim/stats."""
        return {
            "tasks_created": len(self.tasks),
            "tasks_by_callback": dict(self.tasks_by_callback),
            "peak_concurrency": self.peak_concurrency,
            "callbacks_sent": self.callbacks_sent,
            "callbacks_dropped": self.callbacks_dropped,
            "detail_calls": self.detail_calls,
            "run_calls": self.run_calls,
            "kill_calls": self.kill_calls,
            "cancel_calls": self.cancel_calls,
            "sockets_open": sum(len(q) for q in self.subscribers.values()),
            "sockets_opened": self.sockets_opened,
            "sockets_refused": self.sockets_refused,
        }

    def active_count(self) -> int:
        """Number of tasks not yet in a terminal status."""
        return sum(1 for task in self.tasks.values() if not task.terminal)

    def store_file(self, filename: str, content_type: str, data: bytes) -> str:
        """Keep an uploaded input and return its public URL."""
        token = random_token()
        self.files[token] = StoredFile(filename, content_type, data)
        return f"{self.config.base_url}/v1/File/{token}/{filename}"

    def find(self, taskid: str | None = None, token: str | None = None) -> Task | None:
        """Look a task up by id or by socket access token."""
        if taskid:
            return self.tasks.get(taskid.strip())
        if token:
            token = token.strip()
            return next((t for t in self.tasks.values() if t.socketaccesstoken == token), None)
        return None

    # -- the websocket ---------------------------------------------------------------------

    def frame(self, task: Task, kind: str, message: Any = None) -> dict[str, Any]:
        """A frame as Wiro's socket sends it: {type, id, tasktoken, message, result}."""
        return {
            "type": kind,
            "id": task.id,
            "tasktoken": task.socketaccesstoken,
            "message": message,
            "result": True,
        }

    def publish(self, task: Task, kind: str, message: Any = None) -> None:
        """Send a frame to every socket registered for the task."""
        queues = self.subscribers.get(task.socketaccesstoken)
        if not queues:
            return
        frame = self.frame(task, kind, message)
        for queue in queues:
            queue.put_nowait(frame)

    def subscribe(self, token: str) -> asyncio.Queue[dict[str, Any]]:
        """A queue of the frames of the task with this token, from now on."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.subscribers.setdefault(token, set()).add(queue)
        self.sockets_opened += 1
        return queue

    def unsubscribe(self, token: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Forget a closed socket."""
        queues = self.subscribers.get(token)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self.subscribers[token]

    async def _progress(self, task: Task, seconds: float) -> None:
        """task_output frames over ``seconds``: one per step, at most 50."""
        frames = max(1, min(task.steps, 50))
        for k in range(1, frames + 1):
            await asyncio.sleep(seconds / frames)
            current = round(k * task.steps / frames)
            if self.config.socket_progress_text:
                message: Any = f"Step {current}/{task.steps}"
            else:
                message = {
                    "type": "progressGenerate",
                    "percentage": str(round(100 * current / task.steps)),
                    "stepCurrent": str(current),
                    "stepTotal": str(task.steps),
                }
            self.publish(task, "task_output", message)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a coroutine in the background, keeping a reference to it."""
        job = asyncio.get_running_loop().create_task(coro)
        self._background.add(job)
        job.add_done_callback(self._background.discard)
        return job

    def create_task(
        self, prompt: str, steps: int, scale: str, inputs: list[InputRef], callbackurl: str
    ) -> Task:
        """Register a new queued task and start its lifecycle."""
        cfg = self.config
        self._next_id += 1
        task = Task(
            id=str(self._next_id),
            socketaccesstoken=random_token(),
            prompt=prompt,
            steps=steps,
            scale=scale,
            inputs=inputs,
            callbackurl=callbackurl,
            base_url=cfg.base_url,
            fail_mode=cfg.fail_mode,
            duration_s=cfg.task_duration_s,
            output_size_bytes=cfg.output_size_bytes,
            queue_hold_s=cfg.queue_hold_s,
            interim_task_error=cfg.interim_task_error,
            extra_status=cfg.extra_status,
        )
        task.set_status("task_queue")
        self.tasks[task.id] = task
        if callbackurl:
            path = urlsplit(callbackurl).path or "/"
            self.tasks_by_callback[path] = self.tasks_by_callback.get(path, 0) + 1
        self.peak_concurrency = max(self.peak_concurrency, self.active_count())
        self._task_jobs[task.id] = self._spawn(self._lifecycle(task))
        return task

    def finish(self, task: Task, status: str, *, pexit: str = "", error: str = "") -> None:
        """Put a task in a terminal status and schedule its callback."""
        if task.terminal:
            return
        now = time.time()
        if status == "task_cancel":
            task.set_status("task_cancel")
        else:
            task.times.setdefault("endtime", now)
            task.set_status(status)
        task.pexit = pexit
        if error:
            task.debugerror += error
        if status != SUCCESS_STATUS or pexit != "0":
            task.outputs = []
            task.totalcost = "0"
        job = self._task_jobs.pop(task.id, None)
        current = asyncio.current_task()
        if job is not None and job is not current:
            job.cancel()
        self.publish(task, task.status, task.to_dict()["outputs"] if pexit == "0" else None)
        if task.callbackurl:
            self._spawn(self._deliver_callbacks(task, task.to_dict()))

    @staticmethod
    def walk(task: Task) -> list[str]:
        """The statuses a task goes through after task_queue, in Wiro's documented order."""
        walk: list[str] = []
        for status in RUNNING_STATUSES[1:]:
            walk.append(status)
            if status == "task_assign" and task.extra_status:
                walk.append(task.extra_status)
            if status == "task_output" and task.interim_task_error:
                walk += ["task_error", "task_output"]
            if status == "task_output_full" and task.interim_task_error:
                walk.append("task_error_full")
        return walk

    async def _lifecycle(self, task: Task) -> None:
        """Walk the task through Wiro's statuses, spread over its duration."""
        walk = self.walk(task)
        # Inference (task_output, where the progress frames come) takes half the time, as
        # it does most of a real task's; the other statuses share the rest.
        inference = task.duration_s / 2 / max(1, walk.count("task_output"))
        step = (task.duration_s - inference * walk.count("task_output")) / (len(walk) + 1)
        images: list[Image.Image] = []
        png = b""
        try:
            await asyncio.sleep(task.queue_hold_s)
            for status in walk:
                # The steps of the model run while Wiro says task_output: its progress.
                if task.status == "task_output":
                    await self._progress(task, inference)
                else:
                    await asyncio.sleep(step)
                task.set_status(status)
                self.publish(task, status)
                # Stalled while the knob names this status: for ever, for a task that never
                # ends; changing the knob lets every task stalled here go on.
                while self.config.stall_at == status:  # noqa: ASYNC110 - PUT replaces the config
                    await asyncio.sleep(0.05)
                if status == "task_preprocess_start":
                    images = await self._load_inputs(task)
                elif status == "task_error":
                    task.debugerror += STDERR_WARNING
                elif status == "task_output" and task.fail_mode == "none" and not png:
                    png = await asyncio.to_thread(render_output, images, task.prompt)
                    png = await asyncio.to_thread(pad_png, png, task.output_size_bytes)
            await asyncio.sleep(step)
        except TaskFailed as exc:
            self.finish(task, SUCCESS_STATUS, pexit="1", error=str(exc))
            return
        if task.fail_mode == "pexit":
            self.finish(task, SUCCESS_STATUS, pexit="1", error="CUDA out of memory")
            return
        self.outputs[task.uuid] = {OUTPUT_NAME: png}
        task.outputs = [output_entry(task.base_url, task.uuid, len(png))]
        task.totalcost = SUCCESS_COST
        self.finish(task, SUCCESS_STATUS, pexit="0")

    def delete_files(self, task: Task) -> None:
        """Forget a finished task's inputs and outputs: its URLs answer 404 from now on."""
        self.outputs.pop(task.uuid, None)
        for ref in task.inputs:
            token = ref.url.rsplit("/v1/File/", 1)[-1].split("/", 1)[0]
            self.files.pop(token, None)
        task.outputs = []

    def visible(self, task: Task) -> bool:
        """False while Wiro would still answer "There is no task yet." about the task."""
        return time.time() - task.created >= self.config.detail_not_found_s

    def kill(self, task: Task) -> None:
        """Stop a running task: at once, or after ``kill_delay_s`` (the answer comes first)."""
        delay = self.config.kill_delay_s
        if delay <= 0:
            self.finish(task, "task_cancel")
            return
        task.killing = True

        async def later() -> None:
            await asyncio.sleep(delay)
            self.finish(task, "task_cancel")

        self._spawn(later())

    async def _load_inputs(self, task: Task) -> list[Image.Image]:
        """Fetch URL inputs and decode every input; raise TaskFailed on any failure."""
        images: list[Image.Image] = []
        async with httpx.AsyncClient(
            timeout=FETCH_TIMEOUT_S, follow_redirects=True, verify=self._tls
        ) as client:
            for index, ref in enumerate(task.inputs):
                data = ref.data
                if data is None:
                    try:
                        response = await client.get(ref.url)
                    except (httpx.HTTPError, httpx.InvalidURL) as exc:
                        raise TaskFailed(
                            f"inputImage[{index}] could not be fetched from {ref.url}: "
                            f"{type(exc).__name__}"
                        ) from exc
                    if response.status_code != 200:
                        raise TaskFailed(
                            f"inputImage[{index}] could not be fetched from {ref.url}: "
                            f"HTTP {response.status_code}"
                        )
                    data = response.content
                try:
                    images.append(await asyncio.to_thread(decode_image, data))
                except ValueError as exc:
                    raise TaskFailed(f"inputImage[{index}] is not an image: {exc}") from exc
        return images

    def _callback_body(self, snapshot: dict[str, Any]) -> bytes:
        """Encode the callback body according to the callback_body knob."""
        mode = self.config.callback_body
        if mode == "empty":
            return b""
        if mode == "lying":
            lie = dict(snapshot)
            fake = output_entry(self.config.base_url, str(uuid.uuid4()), 202472)
            lie.update(
                status=SUCCESS_STATUS,
                pexit="0",
                debugerror="",
                totalcost=SUCCESS_COST,
                outputs=[fake],
                size=fake["size"],
            )
            snapshot = lie
        return json.dumps(snapshot).encode()

    async def _deliver_callbacks(self, task: Task, snapshot: dict[str, Any]) -> None:
        """POST the task object to its callback URL, obeying the callback knobs."""
        cfg = self.config
        delay = cfg.callback_delay_s + self._rng.uniform(0, cfg.callback_jitter_s)
        if delay > 0:
            await asyncio.sleep(delay)
        body = self._callback_body(snapshot)
        headers = {"content-type": "application/json"}
        async with httpx.AsyncClient(timeout=CALLBACK_TIMEOUT_S, verify=self._tls) as client:
            extra = 1 if self._rng.random() < cfg.repeat_callback_rate else 0
            for _ in range(1 + cfg.repeat_callbacks + extra):
                record: dict[str, Any] = {
                    "at": time.time(),
                    "taskid": task.id,
                    "url": task.callbackurl,
                    "status": snapshot["status"],
                    "body": cfg.callback_body,
                    "dropped": False,
                    "http_status": None,
                    "error": None,
                }
                self.callbacks.append(record)
                if self._rng.random() < cfg.drop_callbacks:
                    record["dropped"] = True
                    self.callbacks_dropped += 1
                    continue
                self.callbacks_sent += 1
                try:
                    response = await client.post(task.callbackurl, content=body, headers=headers)
                    record["http_status"] = response.status_code
                except httpx.HTTPError as exc:
                    record["error"] = f"{type(exc).__name__}: {exc}"
                    logger.warning("callback for task %s failed: %s", task.id, record["error"])
