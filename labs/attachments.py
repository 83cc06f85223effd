"""Attachments and labels for the Allure report, with secrets scrubbed on the way in.

Everything a test attaches goes through `attach`, so redaction happens in one
place: private key blocks, values of the environment variables an inventory
names for passphrases, and `password=`/`token:`-style assignments.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

import allure
from allure_commons.types import AttachmentType

ENV_LABEL = "lab"  # the label naming a result's lab: its Allure environment in a merged report
REDACTED = "«redacted»"
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?-----END [A-Z0-9 ]*PRIVATE KEY-----", re.S)
ASSIGNMENT = re.compile(
    r"(?i)\b(password|passwd|passphrase|secret|token|api[_-]?key|authorization)(\"?\s*[:=]\s*\"?)([^\s\"',;]+)"
)
_secret_values: set[str] = set()


def register_secret_env(names: Iterable[str]) -> None:
    """Scrub the current values of these variables from every attachment."""
    for name in names:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            _secret_values.add(value)


def redact(text: str) -> str:
    text = PRIVATE_KEY.sub(REDACTED, text)
    text = ASSIGNMENT.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    for value in _secret_values:
        text = text.replace(value, REDACTED)
    return text


KINDS = {
    "text": AttachmentType.TEXT,
    "json": AttachmentType.JSON,
    "xml": AttachmentType.XML,
    "yaml": AttachmentType.YAML,
    "png": AttachmentType.PNG,
    "html": AttachmentType.HTML,
}


def attach(name: str, body: str | bytes | Any, kind: str = "text") -> None:
    """Attach to the running test (a no-op outside an Allure run)."""
    if kind == "png":
        allure.attach(body, name=name, attachment_type=KINDS[kind])
        return
    if kind == "json" and not isinstance(body, (str, bytes)):
        body = json.dumps(body, indent=2, default=str, sort_keys=True)
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    allure.attach(redact(text), name=name, attachment_type=KINDS.get(kind, AttachmentType.TEXT))


METRICS_ATTACHMENT = "metrics"  # labs.reporting.metrics reads these back after the run


def record_metrics(subject: str, scenario: str, **values: float | int | str | None) -> dict[str, Any]:
    """One scenario run's numbers (downtime_ms, total_ms, ...) as a JSON attachment of the running test."""
    numbers = {k: v for k, v in values.items() if v is not None}
    rec: dict[str, Any] = {"subject": subject, "scenario": scenario, **numbers}
    attach(METRICS_ATTACHMENT, rec, "json")
    return rec


def step(title: str) -> Any:
    """An Allure step (a context manager); titles carry host and device ids."""
    return allure.step(redact(title))
