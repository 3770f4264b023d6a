"""dreamgate's Python client: submit image edits, wait for them, download the results.

from dreamgate_client import Client

with Client() as dg:  # DREAMGATE_URL, DREAMGATE_KEY
    job = dg.submit(["person.jpg", "jacket.jpg"], "Put the jacket on the person.")
    job = dg.wait(job)
    dg.download_all(job, "results/")
"""

from dreamgate_client._async import AsyncClient
from dreamgate_client._base import DEFAULT_URL, Duration, ImageInput, version
from dreamgate_client._errors import DreamgateError, InvalidWebhook, WaitTimeout
from dreamgate_client._models import (
    TERMINAL,
    Event,
    Input,
    Job,
    JobError,
    Metrics,
    Output,
    Page,
    Priority,
    Progress,
    Status,
    Urls,
    WebhookEvent,
    WebhookEventType,
    WiroInfo,
)
from dreamgate_client._sync import Client
from dreamgate_client._webhooks import verify_webhook

__version__ = version()
__all__ = [
    "DEFAULT_URL",
    "TERMINAL",
    "AsyncClient",
    "Client",
    "DreamgateError",
    "Duration",
    "Event",
    "ImageInput",
    "Input",
    "InvalidWebhook",
    "Job",
    "JobError",
    "Metrics",
    "Output",
    "Page",
    "Priority",
    "Progress",
    "Status",
    "Urls",
    "WaitTimeout",
    "WebhookEvent",
    "WebhookEventType",
    "WiroInfo",
    "__version__",
    "verify_webhook",
]
