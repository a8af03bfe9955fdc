"""An EC2-like HTTP server that VERIFIES request signatures (moto does not).

SigV4: the canonical request is rebuilt from what was received (method,
path, the headers named in SignedHeaders, the body, X-Amz-Date) and signed
with botocore's SigV4Auth; the Authorization header must match. SigV2: the
HMAC-SHA256 over the SigV2 string to sign is recomputed here from the
received form parameters, independently of botocore.

A good request to ``path`` (default ``/services/compute``) gets a valid
``<{Action}Response>`` (a real ``DescribeRegionsResponse`` for
DescribeRegions); a bad signature gets HTTP 401 with an EC2 ``AuthFailure``
error; another path gets a plain 404.

In-process use (tests): ``start(reactor, {"AKID": "secret"})`` listens on
127.0.0.1, on a free port; stop it with ``server.stop()``. As a process:
``python -m tests.support.sigserver --port N --access AKID --secret S``.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import hmac
import re
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote

import attrs
from twisted.web import resource, server

AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, ?SignedHeaders=(?P<signed>[^,]+), ?"
    r"Signature=(?P<sig>[0-9a-f]{64})$"
)

#: How far a request's timestamp may be from the server's clock.
MAX_SKEW = datetime.timedelta(minutes=15)


def _skew_ok(when: datetime.datetime) -> bool:
    return abs(datetime.datetime.now(datetime.UTC) - when) <= MAX_SKEW


def verify_v4(
    method: str,
    host: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    secrets: Mapping[str, str],
    region: str,
) -> str | None:
    """None if the SigV4 signature is right, else why not. ``headers`` has
    lower-case names."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    m = AUTH_RE.match(headers.get("authorization", ""))
    if m is None:
        return "no SigV4 Authorization header"
    if m["key"] not in secrets:
        return f"unknown access key {m['key']}"
    if m["region"] != region or m["service"] != "ec2":
        return f"credential scope {m['region']}/{m['service']}, expected {region}/ec2"
    amz_date = headers.get("x-amz-date", "")
    try:
        when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return f"bad X-Amz-Date {amz_date!r}"
    if not _skew_ok(when) or amz_date[:8] != m["date"]:
        return f"X-Amz-Date {amz_date} out of range or not matching the scope"
    signed = m["signed"].split(";")
    if "host" not in signed:
        return "host is not signed"
    wanted = {}
    for name in signed:
        if name == "host":
            wanted["host"] = host
        elif name in headers:
            wanted[name] = headers[name]
        else:
            return f"signed header {name} missing"
    request = AWSRequest(method=method, url=f"http://{host}{path}", data=body, headers=wanted)
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(m["key"], secrets[m["key"]]), "ec2", region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, m["sig"]):
        return "signature mismatch"
    return None


def v2_string_to_sign(method: str, host: str, path: str, params: Mapping[str, str]) -> str:
    """The SigV2 string to sign: method, lower-case host, path and the
    parameters (but Signature) sorted by name, RFC 3986-encoded."""
    pairs = "&".join(
        f"{quote(k, safe='-_.~')}={quote(params[k], safe='-_.~')}"
        for k in sorted(params)
        if k != "Signature"
    )
    return f"{method.upper()}\n{host.lower()}\n{path or '/'}\n{pairs}"


def verify_v2(
    method: str, host: str, path: str, params: Mapping[str, str], secrets: Mapping[str, str]
) -> str | None:
    """None if the SigV2 signature is right, else why not."""
    if params.get("SignatureVersion") != "2":
        return "SignatureVersion is not 2"
    if params.get("SignatureMethod") != "HmacSHA256":
        return f"unsupported SignatureMethod {params.get('SignatureMethod')!r}"
    key = params.get("AWSAccessKeyId", "")
    if key not in secrets:
        return f"unknown access key {key!r}"
    try:
        when = datetime.datetime.strptime(params.get("Timestamp", ""), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return "bad or missing Timestamp"
    if not _skew_ok(when.replace(tzinfo=datetime.UTC)):
        return "Timestamp out of range"
    digest = hmac.new(
        secrets[key].encode(),
        v2_string_to_sign(method, host, path, params).encode(),
        hashlib.sha256,
    ).digest()
    expected = base64.b64encode(digest).decode()
    if not hmac.compare_digest(expected, params.get("Signature", "")):
        return "signature mismatch"
    return None


def verify(
    method: str,
    host: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    secrets: Mapping[str, str],
    region: str,
) -> tuple[str, str | None]:
    """(signature version seen, None or the reason it is wrong)."""
    params = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    if "authorization" in headers:
        return "v4", verify_v4(method, host, path, headers, body, secrets, region)
    if "Signature" in params:
        return "v2", verify_v2(method, host, path, params, secrets)
    return "none", "request is not signed"


def regions_xml(region: str, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<DescribeRegionsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
        f"<requestId>{request_id}</requestId><regionInfo><item>"
        f"<regionName>{region}</regionName><regionEndpoint>127.0.0.1</regionEndpoint>"
        "</item></regionInfo></DescribeRegionsResponse>"
    ).encode()


def auth_failure_xml(reason: str, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<Response><Errors><Error><Code>AuthFailure</Code><Message>"
        f"AWS was not able to validate the provided access credentials ({reason})"
        f"</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
    ).encode()


@attrs.define
class Seen:
    action: str
    version: str
    error: str | None


class SigResource(resource.Resource):
    isLeaf = True

    def __init__(self, secrets: Mapping[str, str], region: str, path: str) -> None:
        super().__init__()
        self.secrets = dict(secrets)
        self.region = region
        self.path = path
        self.seen: list[Seen] = []

    def render(self, request: Any) -> bytes:
        if request.path.decode() != self.path:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"not found\n"
        body = request.content.read()
        headers = {
            k.decode("latin-1").lower(): v[-1].decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        host = headers.get("host", "")
        version, error = verify(
            request.method.decode(), host, self.path, headers, body, self.secrets, self.region
        )
        action = dict(parse_qsl(body.decode("utf-8"))).get("Action", "")
        self.seen.append(Seen(action, version, error))
        request_id = str(uuid.uuid4())
        request.setHeader(b"content-type", b"text/xml;charset=UTF-8")
        if error is not None:
            request.setResponseCode(401)
            return auth_failure_xml(error, request_id)
        if action == "DescribeRegions":
            return regions_xml(self.region, request_id)
        return (
            f'<{action}Response xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
            f"<requestId>{request_id}</requestId></{action}Response>"
        ).encode()


@attrs.define
class SigServer:
    url: str
    resource: SigResource
    port: Any

    @property
    def seen(self) -> list[Seen]:
        return self.resource.seen

    def stop(self) -> Any:
        return self.port.stopListening()


def start(
    reactor: Any,
    secrets: Mapping[str, str],
    region: str = "us-east-1",
    path: str = "/services/compute",
    port: int = 0,
) -> SigServer:
    """Listen on 127.0.0.1 (``port`` 0: a free one) in this process."""
    res = SigResource(secrets, region, path)
    site = server.Site(res)
    listening = reactor.listenTCP(port, site, interface="127.0.0.1")
    url = f"http://127.0.0.1:{listening.getHost().port}{path}"
    return SigServer(url=url, resource=res, port=listening)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--access", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--path", default="/services/compute")
    args = parser.parse_args()
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    start(reactor, {args.access: args.secret}, args.region, args.path, args.port)
    reactor.run()


if __name__ == "__main__":
    main()
