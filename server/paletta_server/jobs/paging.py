"""Keyset page tokens: opaque to clients, checked field by field when they come back.

A token is the URL-safe base64 of a JSON list ``[kind, ...key]``: for jobs the list's filters
(states, capability) and the (create time, id) of the previous page's last job, for approved
outputs (create time, job id, output index). Any token this server did not make — malformed, made
for other filters, or naming a job or output that does not exist (the manager checks the key
against the store) — is INVALID_ARGUMENT on ``page_token``, never a database error.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import datetime

from paletta_server.errors import InvalidArgument, invalid

_JOB_ID = re.compile(r"[0-9a-f]{32}")
_MAX_INDEX = 2**31 - 1


def _encode(*parts: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts, separators=(",", ":")).encode()).decode()


def _decode(token: str, kind: str, size: int) -> list:
    try:
        parts = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error) as exc:
        raise bad_token() from exc
    if not isinstance(parts, list) or len(parts) != size + 1 or parts[0] != kind:
        raise bad_token()
    return parts[1:]


def bad_token() -> InvalidArgument:
    return invalid("page_token", "not a token returned by this server for this list")


def _created(value: object) -> datetime:
    if not isinstance(value, str):
        raise bad_token()
    try:
        created = datetime.fromisoformat(value)
    except ValueError as exc:
        raise bad_token() from exc
    if created.tzinfo is not None:  # the store's times are naive UTC; ours never carry a zone
        raise bad_token()
    return created


def _job_id(value: object) -> str:
    if not isinstance(value, str) or not _JOB_ID.fullmatch(value):
        raise bad_token()
    return value


def _filters(states: list[str], capability: str) -> list:
    return [sorted(set(states)), capability]


def encode_job_key(created: datetime, job_id: str, states: list[str], capability: str) -> str:
    return _encode("jobs", _filters(states, capability), created.isoformat(), job_id)


def decode_job_key(token: str, states: list[str], capability: str) -> tuple[datetime, str]:
    """The key after which the next page starts; the token must be of a list with these filters."""
    filters, created, job_id = _decode(token, "jobs", 3)
    if filters != _filters(states, capability):
        raise bad_token()
    return _created(created), _job_id(job_id)


def encode_output_key(created: datetime, job_id: str, index: int) -> str:
    return _encode("approved", created.isoformat(), job_id, index)


def decode_output_key(token: str) -> tuple[datetime, str, int]:
    created, job_id, index = _decode(token, "approved", 3)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= _MAX_INDEX:
        raise bad_token()
    return _created(created), _job_id(job_id), index
