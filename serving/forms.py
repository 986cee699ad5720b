"""Strict request parsing for the service's APIs, in place of BentoML 1.4's serdes.

BentoML's multipart parser (``_bentoml_impl.serde.MultipartSerde``) answers 500 to a file sent
under a field the API does not have, downloads any text sent where a file belongs as a URL
(server-side request forgery where ``uvloop`` is installed), JSON-decodes text fields of any
size or nesting (5,000 digits or 100,000 ``[`` raise past its handler) and names the upload's
temporary file after the client's filename (250 bytes → "File name too long"). This one:

* refuses unknown, repeated or missing fields and text where a file belongs (never fetched),
  with a 400 whose message starts with the field's name;
* caps text fields at ``max_field_chars`` characters before decoding them;
* keeps each upload in memory and hands the API a placeholder path that names it in this
  process's :data:`UPLOADS` (under ``/dev/null/``, which no file can be under): the client's
  filename is never used, nothing is written to disk, so nothing outlives a killed worker, and
  no system call is spent per upload (:mod:`serving.guard` drops the entries after the answer).
"""

from __future__ import annotations

import itertools
import json
from http import HTTPStatus
from pathlib import PurePath
from typing import Any

from bentoml.exceptions import BadInput, BentoMLException
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from serving.settings import Settings

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
UPLOADS_KEY = "serving.uploads"  # scope key: the UPLOADS entries of a request, dropped after the answer
UPLOAD_DIR = PurePath("/dev/null")  # a file, so no path under it exists on any disk
UPLOADS: dict[str, bytes] = {}  # placeholder path → the upload's bytes, for the requests in progress
_numbers = itertools.count()


class FieldError(BadInput):
    """A request field outside the contract (400); the message starts with the field's name."""


class TooManyFiles(BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def describe_validation(err: ValidationError) -> str:
    """pydantic's errors as ``field: message; ...`` (the field first, as in every 4xx here)."""
    by_field: dict[str, list[str]] = {}
    for item in err.errors(include_url=False, include_context=False, include_input=False):
        # a union's branches come as target.int, target.str: one line per field reads better
        field = str(item["loc"][0]) if item["loc"] else "body"
        by_field.setdefault(field, []).append(item["msg"])
    return "; ".join(f"{field}: {' or '.join(messages)}" for field, messages in by_field.items())


def _upload_path(scope: dict, data: bytes) -> PurePath:
    """``data`` kept in :data:`UPLOADS` under a placeholder path the API hands to :func:`upload_bytes`."""
    path = UPLOAD_DIR / f"upload-{next(_numbers)}"
    UPLOADS[str(path)] = data
    scope.setdefault(UPLOADS_KEY, []).append(str(path))
    return path


def upload_bytes(path: PurePath) -> bytes | None:
    """The bytes of an upload of a request in progress, or None for any other path."""
    return UPLOADS.get(str(path))


def close_uploads(scope: dict) -> None:
    """Forget the uploads of a finished request."""
    for key in scope.pop(UPLOADS_KEY, None) or ():
        UPLOADS.pop(key, None)


def _decode_text(name: str, value: str, limit: int) -> Any:
    if len(value) > limit:
        raise FieldError(f"{name}: {len(value)} characters, over the limit of {limit} (SERVING_MAX_FIELD_CHARS)")
    # BentoML's own client sends every text field JSON-encoded ("3", "\"gradcam\"", "null");
    # curl sends it bare. The length cap above bounds what json.loads can be made to do.
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value


def _is_list(annotation: Any) -> bool:
    from typing import get_args

    from _bentoml_sdk.typing_utils import is_list_type, is_union_type

    if is_union_type(annotation):
        annotation = get_args(annotation)[0]
    return is_list_type(annotation)


def check_fields(cls: Any, items: list[tuple[str, Any]], settings: Settings, api: str) -> dict[str, Any]:
    """The (field, value) pairs of a request → the API's keyword arguments, or a FieldError/TooManyFiles."""
    fields = cls.model_fields
    files = set(cls.multipart_fields)
    expected = ", ".join(fields) or "no fields"
    grouped: dict[str, list[Any]] = {}
    for name, value in items:
        if name not in fields:
            shown = name if len(name) <= 40 else name[:40] + "..."
            raise FieldError(f"{shown!r}: unknown field; {api} takes: {expected}")
        grouped.setdefault(name, []).append(value)
    data: dict[str, Any] = {}
    for name, values in grouped.items():
        if name in files:
            is_list = _is_list(fields[name].annotation)
            for value in values:
                if not isinstance(value, UploadFile):
                    raise FieldError(f"{name}: expected a file upload (a multipart file part), got a text value; "
                                     "URLs and paths are never fetched")
            if is_list:
                if len(values) > settings.max_files:
                    raise TooManyFiles(f"{name}: {len(values)} files, over the limit of {settings.max_files} "
                                       "(SERVING_MAX_FILES)")
                data[name] = values
            elif len(values) > 1:
                raise FieldError(f"{name}: one file expected, got {len(values)}")
            else:
                data[name] = values[0]
        else:
            if len(values) > 1:
                raise FieldError(f"{name}: given {len(values)} times, expected once")
            if isinstance(values[0], UploadFile):
                raise FieldError(f"{name}: expected a text value, got a file upload")
            data[name] = values[0]
    missing = [name for name in files if name not in data and fields[name].is_required()]
    if missing:
        raise FieldError(f"{missing[0]}: missing; send it as a multipart/form-data file part")
    return data


def install(settings: Settings) -> None:
    """Put the strict serdes in BentoML's table (every content type an API can be sent)."""
    from _bentoml_impl import serde

    class StrictJSON(serde.JSONSerde):
        async def parse_request(self, request, cls):
            api = request.url.path
            body = await request.body()
            if cls.multipart_fields:  # a file API: only forms can carry the file
                raise FieldError(f"{cls.multipart_fields[0]}: missing; send multipart/form-data with a file part "
                                 f"named {cls.multipart_fields[0]!r}")
            try:
                parsed = json.loads(body) if body.strip() else {}
            except (ValueError, RecursionError) as err:
                raise FieldError(f"body: not JSON ({type(err).__name__})") from None
            if not isinstance(parsed, dict):
                raise FieldError(f"body: expected a JSON object, got {type(parsed).__name__}")
            data = check_fields(cls, list(parsed.items()), settings, api)
            try:
                return cls.model_validate(data)
            except ValidationError as err:
                raise FieldError(describe_validation(err)) from None

    class StrictForm(serde.MultipartSerde):
        async def parse_request(self, request, cls):
            api = request.url.path
            try:
                # text parts may be as large as the body: max_field_chars then refuses them by name
                form = await request.form(max_files=settings.max_files, max_fields=32,
                                          max_part_size=settings.max_bytes)
            except HTTPException as err:
                if "Too many files" in str(err.detail):
                    raise TooManyFiles(f"more than {settings.max_files} files (SERVING_MAX_FILES)") from None
                raise FieldError(f"body: malformed form data: {err.detail}") from None
            except (ValueError, KeyError, AssertionError) as err:  # python-multipart on odd headers
                raise FieldError(f"body: malformed form data: {type(err).__name__}") from None
            items = []
            for name, value in form.multi_items():
                if isinstance(value, str) and name not in cls.multipart_fields:  # text in a file field: 400 below
                    value = _decode_text(name, value, settings.max_field_chars)
                items.append((name, value))
            data = check_fields(cls, items, settings, api)
            for name in cls.multipart_fields:
                if name in data:
                    uploads = data[name] if isinstance(data[name], list) else [data[name]]
                    paths = [_upload_path(request.scope, await upload.read()) for upload in uploads]
                    data[name] = paths if isinstance(data[name], list) else paths[0]
            try:
                return cls.model_validate(data)
            except ValidationError as err:
                raise FieldError(describe_validation(err)) from None

    serde.ALL_SERDE["application/json"] = StrictJSON  # type: ignore[index]  # also every unknown type
    for media_type in FORM_TYPES:
        serde.ALL_SERDE[media_type] = StrictForm  # type: ignore[index]
