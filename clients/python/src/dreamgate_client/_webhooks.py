"""Verifying the gateway's webhooks (Standard Webhooks, with the reference library)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from standardwebhooks.webhooks import Webhook

from dreamgate_client._errors import InvalidWebhook
from dreamgate_client._models import Job, WebhookEvent, _time


def verify_webhook(body: bytes | str, headers: Mapping[str, str], secret: str) -> WebhookEvent:
    """The event of a webhook request once its signature checks out.

    ``body`` is the request body exactly as received, ``headers`` its headers
    (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``; any case), ``secret``
    the key's ``whsec_…`` webhook secret. Raises :class:`InvalidWebhook` for a bad or
    missing signature, a timestamp more than 5 minutes off, or a body that is no event.
    """
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    try:
        payload: Any = Webhook(secret).verify(body, lowered)
    except Exception as exc:  # WebhookVerificationError, and base64/header parse errors
        raise InvalidWebhook(f"the webhook does not verify: {exc}") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
        raise InvalidWebhook("the webhook's body is not a dreamgate event")
    try:
        job = Job.from_dict(payload["data"])
    except (KeyError, ValueError, TypeError, AssertionError) as exc:
        raise InvalidWebhook(f"the webhook's job does not parse: {exc}") from exc
    return WebhookEvent(
        id=lowered["webhook-id"],
        type=str(payload.get("type") or ""),
        timestamp=_time(payload.get("timestamp")),
        data=job,
    )
