"""Strict parsing of the APIs' request bodies: multipart/urlencoded forms (and JSON for /metadata).

* unknown, repeated or missing fields, and text where a file belongs (never fetched as a URL or
  path), are refused with a 400 whose message starts with the field's name;
* text fields are capped at ``max_field_chars`` characters before they are decoded;
* the body is capped at ``max_bytes`` (413), uploads stay in memory (the client's filename is
  never used, nothing is written to disk);
* media types are matched case-insensitively (``MULTIPART/FORM-DATA`` is a form).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from serving.errors import FieldError, PayloadTooLarge
from serving.settings import Settings

FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")


@dataclass(frozen=True)
class Form:
    """An API's fields: its file fields (name → whether it repeats) and a model of its text fields."""

    files: dict[str, bool]
    text: type[BaseModel]


@dataclass
class Parsed:
    files: dict[str, Any]  # name → bytes, or a list of bytes for a repeated field
    values: BaseModel


def describe_validation(err: ValidationError) -> str:
    """pydantic's errors as ``field: message; ...`` (the field first, as in every 4xx here)."""
    by_field: dict[str, list[str]] = {}
    for item in err.errors(include_url=False, include_context=False, include_input=False):
        # a union's branches come as target.int, target.str: one line per field reads better
        field = str(item["loc"][0]) if item["loc"] else "body"
        by_field.setdefault(field, []).append(item["msg"])
    return "; ".join(f"{field}: {' or '.join(messages)}" for field, messages in by_field.items())


def decode_text(name: str, value: str, limit: int) -> Any:
    if len(value) > limit:
        raise FieldError(f"{name}: {len(value)} characters, over the limit of {limit} (SERVING_MAX_FIELD_CHARS)")
    # BentoML's own client sends every text field JSON-encoded ("3", "\"gradcam\"", "null");
    # curl sends it bare. The length cap above bounds what json.loads can be made to do.
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value


def media_type(request: Request) -> bytes:
    """The Content-Type without its parameters, lower-cased (media types are case-insensitive)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower().encode("latin-1")


def bounded(request: Request, limit: int) -> Request:
    """The request with its body refused (413) past ``limit`` bytes, declared or counted."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body: {int(declared)} bytes, over the limit of {limit} (SERVING_MAX_BYTES)")
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:  # chunked uploads declare no length
            raise PayloadTooLarge(f"body: over the limit of {limit} bytes (SERVING_MAX_BYTES)")
        return message

    return Request(request.scope, receive)


async def parse(request: Request, form: Form, settings: Settings) -> Parsed:
    """The request's fields checked against ``form``, or a FieldError / PayloadTooLarge."""
    request = bounded(request, settings.max_bytes)
    kind = media_type(request)
    if kind not in FORM_TYPES:
        if form.files:  # a file API: only forms can carry the file
            name = next(iter(form.files))
            raise FieldError(f"{name}: missing; send multipart/form-data with a file part named {name!r}")
        body = await request.body()
        try:
            parsed = json.loads(body) if body.strip() else {}
        except (ValueError, RecursionError) as err:
            raise FieldError(f"body: not JSON ({type(err).__name__})") from None
        if not isinstance(parsed, dict):
            raise FieldError(f"body: expected a JSON object, got {type(parsed).__name__}")
        return _checked(form, list(parsed.items()), settings)
    try:
        # text parts may be as large as the body: max_field_chars then refuses them by name
        data = await request.form(max_files=settings.max_files, max_fields=32, max_part_size=settings.max_bytes)
    except HTTPException as err:
        if "Too many files" in str(err.detail):
            raise PayloadTooLarge(f"more than {settings.max_files} files (SERVING_MAX_FILES)") from None
        raise FieldError(f"body: malformed form data: {err.detail}") from None
    except (ValueError, KeyError, AssertionError) as err:  # python-multipart on odd headers
        raise FieldError(f"body: malformed form data: {type(err).__name__}") from None
    items = []
    for name, value in data.multi_items():
        if isinstance(value, UploadFile):
            value = await value.read() if name in form.files else _FileSent()
        elif name not in form.files:
            value = decode_text(name, value, settings.max_field_chars)
        else:
            value = _TextSent()
        items.append((name, value))
    return _checked(form, items, settings)


class _FileSent:  # a file under a text field's name
    pass


class _TextSent:  # text under a file field's name
    pass


def _checked(form: Form, items: list[tuple[str, Any]], settings: Settings) -> Parsed:
    known = [*form.files, *form.text.model_fields]
    grouped: dict[str, list[Any]] = {}
    for name, value in items:
        if name not in known:
            shown = name if len(name) <= 40 else name[:40] + "..."
            raise FieldError(f"{shown!r}: unknown field; this endpoint takes: {', '.join(known) or 'no fields'}")
        grouped.setdefault(name, []).append(value)
    files: dict[str, Any] = {}
    text: dict[str, Any] = {}
    for name, values in grouped.items():
        if name in form.files:
            if any(not isinstance(v, bytes) for v in values):
                raise FieldError(f"{name}: expected a file upload (a multipart file part), got a text value; "
                                 "URLs and paths are never fetched")
            if form.files[name]:
                if len(values) > settings.max_files:
                    raise PayloadTooLarge(f"{name}: {len(values)} files, over the limit of {settings.max_files} "
                                          "(SERVING_MAX_FILES)")
                files[name] = values
            elif len(values) > 1:
                raise FieldError(f"{name}: one file expected, got {len(values)}")
            else:
                files[name] = values[0]
        else:
            if len(values) > 1:
                raise FieldError(f"{name}: given {len(values)} times, expected once")
            if isinstance(values[0], _FileSent):
                raise FieldError(f"{name}: expected a text value, got a file upload")
            text[name] = values[0]
    missing = [name for name in form.files if name not in files]
    if missing:
        raise FieldError(f"{missing[0]}: missing; send it as a multipart/form-data file part")
    try:
        return Parsed(files, form.text.model_validate(text))
    except ValidationError as err:
        raise FieldError(describe_validation(err)) from None
