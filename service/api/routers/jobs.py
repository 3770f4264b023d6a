"""The jobs API: submit, read, list, cancel."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service import intake, jobs, pipeline
from service.api.deps import ServicesDep
from service.api.errors import ProblemError, responses
from service.api.schemas import SEED_PROMPT, EditParams, JobCreate, JobOut, JobPage, job_out
from service.container import Services
from service.db import transaction
from service.models import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Image files, in order; the first is the image edited.",
        },
        "image_urls": {"type": "array", "items": {"type": "string", "format": "uri"}},
        "prompt": {"type": "string", "example": SEED_PROMPT},
        "steps": {"type": "integer", "default": 25, "minimum": 1, "maximum": 500},
        "scale": {"type": "number", "default": 3.5},
        "webhook_url": {"type": "string", "format": "uri"},
        "metadata": {"type": "string", "description": "A JSON object, as text."},
    },
}


def _load(svc: Services, job_id: uuid.UUID, *, full: bool = True) -> JobOut:
    with transaction(svc.sessions) as s:
        job = jobs.get(s, job_id, full=True)
        if job is None:
            raise ProblemError(404, "job_not_found", f"no job {job_id}")
        return job_out(job, svc.storage, svc.settings.presign_ttl_s, full=full)


def _invalid(exc: ValidationError, prefix: str = "body") -> RequestValidationError:
    return RequestValidationError(
        [
            {**e, "loc": (prefix, *e["loc"])}
            for e in exc.errors(include_url=False, include_input=False)
        ]
    )


async def _parse_multipart(request: Request, svc: Services) -> intake.Submission:
    max_images = svc.settings.max_images
    try:
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 16)
    except Exception as exc:  # python-multipart raises several types for broken bodies
        raise ProblemError(400, "malformed_body", f"malformed multipart body: {exc}") from exc
    images: list[intake.Upload | str] = []
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name == "images":
            if not isinstance(value, UploadFile):
                raise ProblemError(422, "validation_error", "images: must be files")
            if value.size is not None and value.size > svc.settings.max_image_bytes:
                raise ProblemError(
                    413,
                    "image_too_large",
                    f"images[{len(images)}] is larger than {svc.settings.max_image_bytes} bytes",
                )
            images.append(intake.Upload(filename=value.filename or "image", file=value.file))
        elif name == "image_urls":
            images.append(str(value))
        elif isinstance(value, UploadFile):
            raise ProblemError(422, "validation_error", f"{name}: must not be a file")
        elif name in fields:
            raise ProblemError(422, "validation_error", f"{name}: given more than once")
        else:
            fields[name] = value
    if "metadata" in fields:
        try:
            fields["metadata"] = json.loads(fields["metadata"])
        except ValueError as exc:
            raise ProblemError(422, "validation_error", "metadata: not valid JSON") from exc
    try:
        params = EditParams.model_validate(fields)
        urls = [u for u in images if isinstance(u, str)]
        if urls:
            JobCreate.model_validate({"image_urls": urls, "prompt": "x"})
    except ValidationError as exc:
        raise _invalid(exc) from exc
    return _submission(params, images)


def _submission(params: EditParams, images: list[intake.Upload | str]) -> intake.Submission:
    return intake.Submission(
        prompt=params.prompt,
        steps=params.steps,
        scale=params.scale,
        images=images,
        webhook_url=str(params.webhook_url) if params.webhook_url else None,
        metadata=params.metadata,
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    summary="Submit an edit job",
    description=(
        "Send one or more images (uploaded as repeated `images` file parts, or as repeated "
        "`image_urls`; also `application/json` with `image_urls`) with a prompt. The first "
        "image is the one edited; the others are references. Answers 202 with the job and "
        "its `Location`."
    ),
    responses=responses(400, 413, 415, 422),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": MULTIPART_SCHEMA},
                "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}},
            },
        }
    },
)
async def create_job(request: Request, response: Response, svc: ServicesDep) -> JobOut:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        sub = await _parse_multipart(request, svc)
    elif ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise ProblemError(400, "malformed_body", "the body is not valid JSON") from exc
        try:
            data = JobCreate.model_validate(body)
        except ValidationError as exc:
            raise _invalid(exc) from exc
        sub = _submission(data, [str(u) for u in data.image_urls])
    else:
        raise ProblemError(
            415, "unsupported_media_type", "send multipart/form-data or application/json"
        )
    if not sub.images:
        raise ProblemError(422, "no_images", "give at least one image (images or image_urls)")
    if len(sub.images) > svc.settings.max_images:
        raise ProblemError(
            422, "too_many_images", f"at most {svc.settings.max_images} images per job"
        )
    try:
        job_id = await run_in_threadpool(intake.accept, svc, sub)
    except intake.InputError as exc:
        code = 413 if exc.code == "image_too_large" else 422
        raise ProblemError(code, exc.code, exc.message) from exc
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return await run_in_threadpool(_load, svc, job_id)


@router.get(
    "/{job_id}",
    response_model=JobOut,
    summary="Get a job",
    description="Status, Wiro's own status, the timeline, outputs with presigned URLs, error.",
    responses=responses(404, 422),
)
def get_job(job_id: uuid.UUID, svc: ServicesDep) -> JobOut:
    return _load(svc, job_id)


@router.get(
    "",
    response_model=JobPage,
    summary="List jobs",
    description="Newest first; filter by status; follow `next_cursor` for older jobs.",
    responses=responses(422),
)
def list_jobs(
    svc: ServicesDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobPage:
    with transaction(svc.sessions) as s:
        try:
            rows, next_cursor = jobs.page(s, status=status_, cursor=cursor, limit=limit)
        except ValueError as exc:
            raise ProblemError(422, "invalid_cursor", str(exc)) from exc
        data = [job_out(j, svc.storage, svc.settings.presign_ttl_s, full=False) for j in rows]
    return JobPage(data=data, next_cursor=next_cursor)


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job",
    description=(
        "A job Wiro does not have yet is canceled at once (200). One at Wiro gets Task/Cancel "
        "while queued there or Task/Kill while running (202; the job turns `canceled` when "
        "Wiro confirms). A finished job cannot be canceled (409)."
    ),
    responses={
        202: {"model": JobOut, "description": "Cancel requested at Wiro"},
        **responses(404, 409),
    },
)
def cancel_job(job_id: uuid.UUID, response: Response, svc: ServicesDep) -> JobOut:
    try:
        done = pipeline.request_cancel(svc, job_id)
    except LookupError as exc:
        raise ProblemError(404, "job_not_found", f"no job {job_id}") from exc
    except pipeline.NotCancelable as exc:
        raise ProblemError(409, "job_not_cancelable", str(exc)) from exc
    response.status_code = 200 if done else 202
    return _load(svc, job_id)
