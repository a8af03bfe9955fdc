"""botocore, used for its EC2 model, serializer, signers and parser only.

botocore never sends anything here: it turns a call into a signed request
(method, URL, headers, body) and turns the answer's bytes into a dict. The
session and the EC2 model (~0.3 s, ~25 MB) are loaded once per process, on
first use, never at import time; botocore itself is imported lazily too.

These botocore calls are stable in practice but not documented API, which is
why setup.cfg pins botocore to one minor line.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

import attrs

from txvmbot.errors import CloudError, TransportError, TxvmbotError
from txvmbot.model import Credentials, SignatureVersion

if TYPE_CHECKING:
    from botocore.model import OperationModel, ServiceModel

__all__ = [
    "ParamError",
    "SignedRequest",
    "api_version",
    "botocore_version",
    "handle_response",
    "prepare_params",
    "sign_request",
]

#: Root element names an EC2 error answer may have.
_ERROR_ROOTS = frozenset({"Response", "ErrorResponse"})

#: The first element's name, after any XML declaration, comments or doctype.
_FIRST_TAG = re.compile(rb"<(?![?!])([^\s/>]+)")


class ParamError(TxvmbotError, TypeError):
    """The parameters of a call do not fit the EC2 model (or the operation
    does not exist). Raised before anything is sent; never retried.

    ``operation`` names the call, ``report`` is botocore's validation report,
    which names every bad parameter.
    """

    def __init__(self, operation: str, report: str) -> None:
        super().__init__(f"{operation}: invalid parameters: {report}")
        self.operation = operation
        self.report = report


@attrs.frozen
class SignedRequest:
    """One signed HTTP request, ready for Twisted's Agent.

    ``headers`` never contains ``Content-Length`` (Twisted computes it from
    the body producer) nor ``Host`` (the Agent writes it from the URL, the
    same way botocore computed it for the signature).
    """

    method: bytes
    url: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes


@attrs.frozen
class _Botocore:
    session: Any
    service_model: ServiceModel
    serializer: Any
    parser: Any
    validator: Any
    version: str


_loaded: _Botocore | None = None


def _parser_factory() -> Any:
    from botocore.parsers import ResponseParserFactory

    factory = ResponseParserFactory()
    factory.set_parser_defaults(timestamp_parser=parse_timestamp)
    return factory


def parse_timestamp(value: Any) -> Any:
    """A timestamp of an answer: the same instant botocore's parser gives,
    as an aware datetime (its tzinfo is ``datetime.timezone``, not
    dateutil's).

    EC2 writes ISO 8601 with a zone (``2026-11-22T05:39:00.000Z``), which
    the standard library parses tens of times faster than botocore's own
    parser (dateutil), and a DescribeInstances answer holds several per
    instance (bench/hot_paths.py prints both). Anything else (no zone, epoch seconds, odd formats of private
    clouds) goes to botocore's parser as before."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                return parsed
    from botocore.utils import parse_timestamp as botocore_parse

    return botocore_parse(value)


def _load() -> _Botocore:
    """The process-wide botocore objects, loaded on first use."""
    global _loaded
    if _loaded is None:
        import botocore
        import botocore.session
        from botocore.serialize import create_serializer
        from botocore.validate import ParamValidator

        session = botocore.session.Session()
        _loaded = _Botocore(
            session=session,
            service_model=session.get_service_model("ec2"),
            # We validate ourselves, before the first attempt, to raise our
            # own error; the serializer need not do it again on every retry.
            serializer=create_serializer("ec2", include_validation=False),
            parser=_parser_factory().create_parser("ec2"),
            validator=ParamValidator(),
            version=botocore.__version__,
        )
    return _loaded


def api_version() -> str:
    """The EC2 API version of the botocore model (loads the model)."""
    return str(_load().service_model.api_version)


def botocore_version() -> str:
    """The version of botocore (does not load the model)."""
    import botocore

    return str(botocore.__version__)


_operations: dict[str, OperationModel] = {}


def _operation(operation: str) -> OperationModel:
    # Cached: botocore's operation_names is a list, scanned on every lookup
    # (three per request; bench/parallel_vs_boto3.py's profile).
    found = _operations.get(operation)
    if found is None:
        model = _load().service_model
        if operation not in model.operation_names:
            raise ParamError(operation, f"no such EC2 operation in API version {model.api_version}")
        found = _operations[operation] = model.operation_model(operation)
    return found


def prepare_params(operation: str, params: dict[str, Any]) -> dict[str, Any]:
    """Apply the glue boto3 does in its event handlers, then validate.

    Returns a new dict; ``params`` is not changed. For RunInstances a
    ``ClientToken`` (uuid4) is added when the caller gave none, so every retry
    of this call carries the same token, and ``UserData`` (str or bytes, plain)
    is base64-encoded. Raises ParamError naming every bad parameter.
    """
    op = _operation(operation)
    params = dict(params)
    if operation == "RunInstances":
        params.setdefault("ClientToken", str(uuid.uuid4()))
        user_data = params.get("UserData")
        if isinstance(user_data, str):
            user_data = user_data.encode("utf-8")
        if isinstance(user_data, bytes):
            params["UserData"] = base64.b64encode(user_data).decode("ascii")
    shape = op.input_shape
    if shape is not None:
        report = _load().validator.validate(params, shape)
        if report.has_errors():
            raise ParamError(operation, report.generate_report())
    elif params:
        raise ParamError(operation, f"takes no parameters, got {sorted(params)}")
    return params


def sign_request(
    operation: str,
    params: dict[str, Any],
    *,
    endpoint: str,
    region: str,
    credentials: Credentials,
    signature_version: SignatureVersion,
    user_agent: str,
) -> SignedRequest:
    """Serialize ``params`` (already prepared) and sign them, now.

    Called once per attempt: each attempt gets a fresh timestamp.
    """
    from botocore.auth import SigV2Auth, SigV4Auth
    from botocore.awsrequest import create_request_object, prepare_request_dict
    from botocore.credentials import Credentials as BotoCredentials

    b = _load()
    request_dict = b.serializer.serialize_to_request(params, _operation(operation))
    prepare_request_dict(request_dict, endpoint, user_agent=user_agent)
    request = create_request_object(request_dict)
    creds = BotoCredentials(
        credentials.access_key, credentials.secret_key, credentials.session_token
    )
    signer: Any
    if signature_version == "v2":
        signer = SigV2Auth(creds)
    else:
        signer = SigV4Auth(creds, "ec2", region)
    signer.add_auth(request)
    prepared = request.prepare()
    body = prepared.body or b""
    if isinstance(body, str):
        body = body.encode("utf-8")
    headers: dict[bytes, list[bytes]] = {}
    for name, value in prepared.headers.items():
        if name.lower() in ("content-length", "host"):
            continue
        headers.setdefault(name.encode("latin-1"), []).append(value.encode("latin-1"))
    return SignedRequest(
        method=prepared.method.encode("ascii"),
        url=prepared.url.encode("ascii"),
        headers=headers,
        body=body,
    )


def _root_tag(body: bytes) -> str | None:
    """The name of the first XML element of ``body`` (namespace prefix
    dropped), or None when ``body`` does not look like XML."""
    head = body[:4096].lstrip()
    if not head.startswith(b"<"):
        return None
    match = _FIRST_TAG.search(head)
    if match is None:
        return None
    return match.group(1).decode("utf-8", "replace").rpartition(":")[2]


def _snippet(body: bytes) -> str:
    text = " ".join(body[:200].decode("utf-8", "replace").split())
    return repr(text) if text else "an empty body"


def handle_response(
    operation: str, status: int, headers: dict[str, str], body: bytes
) -> dict[str, Any]:
    """Turn an HTTP answer into botocore's parsed dict minus ResponseMetadata,
    or raise CloudError (the cloud said no) or TransportError (the answer is
    not what an EC2 endpoint says).

    ``headers`` has lower-case names.
    """
    b = _load()
    op = _operation(operation)
    root = _root_tag(body)
    response = {"status_code": status, "headers": headers, "body": body}
    if 200 <= status < 300:
        expected = f"{operation}Response"
        if root != expected:
            what = f"root element <{root}>" if root else "no XML"
            raise TransportError(
                operation,
                f"HTTP {status} with {what}, expected <{expected}> "
                f"(is the endpoint an EC2 API?): {_snippet(body)}",
            )
        try:
            parsed = dict(b.parser.parse(response, op.output_shape))
        except Exception as e:
            raise TransportError(
                operation, f"could not parse the answer ({e}): {_snippet(body)}"
            ) from e
        parsed.pop("ResponseMetadata", None)
        if operation == "GetConsoleOutput":
            _decode_console(parsed)
        return parsed

    request_id = headers.get("x-amzn-requestid") or headers.get("x-amz-request-id")
    if root in _ERROR_ROOTS:
        try:
            parsed = b.parser.parse(response, op.output_shape)
        except Exception:
            parsed = {}
        error = parsed.get("Error") or {}
        code = error.get("Code")
        if code:
            request_id = parsed.get("ResponseMetadata", {}).get("RequestId") or request_id
            raise CloudError(operation, code, error.get("Message") or "", status, request_id)
    content_type = headers.get("content-type", "no content type")
    raise CloudError(
        operation,
        f"HTTP{status}",
        f"not an EC2 error answer ({content_type}): {_snippet(body)}",
        status,
        request_id,
    )


def _decode_console(parsed: dict[str, Any]) -> None:
    """GetConsoleOutput's Output is base64; make it text, as boto3 does."""
    output = parsed.get("Output")
    if isinstance(output, str):
        try:
            raw = base64.b64decode(output, validate=False)
        except (binascii.Error, ValueError):
            return
        parsed["Output"] = raw.decode("utf-8", "replace")
