"""CheckRequest -> input document, case by case against what opa-envoy-plugin builds.

The cases are retyped from opa-envoy-plugin's ``envoyauth/request_test.go`` (``TestGetParsedBody``,
``TestGetParsedBodygRPC``, ``TestParsedPathAndQuery``, ``TestSourcePeerAttributes``),
``envoyauth/protomap_test.go`` (``Test_protomap``) and ``internal/internal_test.go``
(``TestCheckAllowDecisionWithSkipRequestBodyParse``, ``TestCheckDecisionTruncatedBodyWithLogger``);
each row names the upstream case it mirrors. Requests are written in protojson, as upstream's.
The gRPC descriptor set is built here (upstream's ``test/files/Book.proto``, retyped), not copied.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import descriptor_pb2, json_format

from legation.extauthz._body import ProtoSet
from legation.extauthz.errors import AuthzError
from legation.extauthz.request import InputOptions, build_input


def check_request(http: dict[str, Any], **attributes: Any) -> external_auth_pb2.CheckRequest:
    doc = {"attributes": {"request": {"http": http}, **attributes}}
    return json_format.ParseDict(doc, external_auth_pb2.CheckRequest())


def body_request(
    ctype: str | None, body: str = "", *, raw: bytes = b"", **headers: str
) -> external_auth_pb2.CheckRequest:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    if ctype is not None:
        hdrs["content-type"] = ctype
    http: dict[str, Any] = {"headers": hdrs, "body": body}
    if raw:
        http["raw_body"] = base64.b64encode(raw).decode()
    return check_request(http)


MULTIPART = (
    '--foo\nContent-Disposition: form-data; name="foo"\nContent-Type: text/plain\n\n'
    "bar\n--foo--\n\t\t\t\t"
)
MULTIPART_JSON = (
    '--foo\nContent-Disposition: form-data; name="foo"\nContent-Type: text/plain\n\n'
    'bar\n--foo\nContent-Disposition: form-data; name="bar"\n'
    'Content-Type: application/json;\n\n{"name": "bar"}\n--foo--\n\t\t\t\t'
)
JSON_OBJECT = '{"firstname": "foo", "lastname": "bar"}'
CL = "content_length"
PARTIAL = "x_envoy_auth_partial_body"

# (upstream TestGetParsedBody case, request, parsed_body, truncated_body)
BODY_CASES = [
    ("no_content_type", body_request(None, **{CL: "0"}), None, False),
    ("content_type_text", body_request("text/html"), None, False),
    ("content_type_json_string", body_request("application/json", '"foo"'), "foo", False),
    ("content_type_json_boolean", body_request("application/json", "true"), True, False),
    ("content_type_json_number", body_request("application/json", "42"), 42, False),
    ("content_type_json_null", body_request("application/json", "null"), None, False),
    (
        "content_type_json_object",
        body_request("application/json", JSON_OBJECT),
        {"firstname": "foo", "lastname": "bar"},
        False,
    ),
    (
        "content_type_json_array",
        body_request("application/json", '["hello", "opa"]'),
        ["hello", "opa"],
        False,
    ),
    (
        "content_type_json_with_special_chars",
        body_request(
            "application/json",
            r'["\"", "\\", "\/", "/", "\b", "\f", "\n", "\r", "\t", '
            r'"\u0041"]',
        ),
        ['"', "\\", "/", "/", "\b", "\f", "\n", "\r", "\t", "A"],
        False,
    ),
    (
        "content_type_multipart_form_data",
        body_request("multipart/form-data; boundary=foo", MULTIPART),
        {"foo": ["bar"]},
        False,
    ),
    (
        "content_type_multipart_form_data_with_json",
        body_request("multipart/form-data; boundary=foo", MULTIPART_JSON),
        {"foo": ["bar"], "bar": [{"name": "bar"}]},
        False,
    ),
    ("empty_content", body_request("application/json", ""), None, False),
    ("body_truncated", body_request("application/json", "true", **{CL: "1000"}), None, True),
    (
        "content_type_url_encoded_raw",
        body_request("application/x-www-form-urlencoded", raw=b"firstname=foo&lastname=bar"),
        {"firstname": ["foo"], "lastname": ["bar"]},
        False,
    ),
    (
        "content_type_url_encoded",
        body_request("application/x-www-form-urlencoded", "firstname=foo&lastname=bar"),
        {"firstname": ["foo"], "lastname": ["bar"]},
        False,
    ),
    (
        "content_type_url_encoded_empty",
        body_request("application/x-www-form-urlencoded", ""),
        None,
        False,
    ),
    (
        "content_type_url_encoded_multiple_values",
        body_request(
            "application/x-www-form-urlencoded", "firstname=foo&lastname=bar&lastname=foobar"
        ),
        {"firstname": ["foo"], "lastname": ["bar", "foobar"]},
        False,
    ),
    (
        "content_type_url_encoded_truncated",
        body_request(
            "application/x-www-form-urlencoded", "firstname=foo&lastname=bar", **{CL: "1000"}
        ),
        None,
        True,
    ),
    (
        "content_type_json_with_raw_body",
        body_request(
            "application/json", raw=b'{\n    "firstname": "foo",\n    "lastname": "bar"\n}'
        ),
        {"firstname": "foo", "lastname": "bar"},
        False,
    ),
    (
        "partial_body_json",
        body_request("application/json", JSON_OBJECT, **{PARTIAL: "true"}),
        None,
        True,
    ),
    (
        "not_partial_body_json",
        body_request("application/json", JSON_OBJECT, **{PARTIAL: "false"}),
        {"firstname": "foo", "lastname": "bar"},
        False,
    ),
    (
        "partial_body_url_encoded",
        body_request(
            "application/x-www-form-urlencoded", "firstname=foo&lastname=bar", **{PARTIAL: "true"}
        ),
        None,
        True,
    ),
    (
        "partial_body_multipart",
        body_request("multipart/form-data; boundary=foo", MULTIPART, **{PARTIAL: "true"}),
        None,
        True,
    ),
    # upstream matches the content type by substring (request.go getParsedBody): a +json type
    # is JSON only when it contains "application/json"; a body whose type is not parsed is never
    # truncated, whatever its content-length
    (
        "(request.go) json-patch+json contains application/json",
        body_request("application/json-patch+json", "[]"),
        [],
        False,
    ),
    (
        "(request.go) merge-patch+json is not parsed",
        body_request("application/merge-patch+json", "{}"),
        None,
        False,
    ),
    (
        "(request.go) text with a larger content-length",
        body_request("text/plain", "x", **{CL: "10"}),
        None,
        False,
    ),
    (
        "(request.go) multipart without boundary",
        body_request("multipart/form-data", MULTIPART),
        None,
        False,
    ),
    # TestCheckDecisionTruncatedBodyWithLogger: content-length equal to the body
    (
        "TestCheckDecisionTruncatedBodyWithLogger (62 bytes)",
        body_request(
            "application/json",
            '{"firstname": "foo", "lastname": "bar", "dept": {"it": "eng"}}',
            **{CL: "62"},
        ),
        {"firstname": "foo", "lastname": "bar", "dept": {"it": "eng"}},
        False,
    ),
]


@pytest.mark.parametrize(
    ("request_", "body", "truncated"), [c[1:] for c in BODY_CASES], ids=[c[0] for c in BODY_CASES]
)
def test_parsed_body_as_upstream(
    request_: external_auth_pb2.CheckRequest, body: Any, truncated: bool
) -> None:
    doc = build_input(request_)
    assert doc["parsed_body"] == body and type(doc["parsed_body"]) is type(body)
    assert doc["truncated_body"] is truncated


@pytest.mark.parametrize(
    "request_",
    [
        body_request("application/json", '["foo" : 42}'),  # TestGetParsedBody: invalid JSON
        body_request("application/json", "NaN"),  # not JSON in Go either
        body_request("application/json", "true", **{CL: "ten"}),  # strconv.ParseInt fails
        body_request("application/x-www-form-urlencoded", "a=%zz"),  # url.ParseQuery fails
        body_request("multipart/form-data; boundary=foo", "--foo\nno header colon\n\nx\n--foo--"),
        body_request(
            "multipart/form-data; boundary=foo",
            '--foo\nContent-Disposition: form-data; name="j"\n'
            "Content-Type: application/json\n\n{bad\n--foo--\n",
        ),
        body_request(
            "multipart/form-data; boundary=foo",
            '--foo\nContent-Disposition: form-data; name="a"\n\nnever closed\n',
        ),
    ],
)
def test_unparsable_bodies_are_400_as_upstream_request_parse_error(
    request_: external_auth_pb2.CheckRequest,
) -> None:
    with pytest.raises(AuthzError) as err:
        build_input(request_)
    assert err.value.code == "malformed_body" and err.value.status == 400


# TestParsedPathAndQuery
PATH_CASES = [
    ("/my/test/path", ["my", "test", "path"], {}),
    ("/my/test/path?a=1", ["my", "test", "path"], {"a": ["1"]}),
    ("/my/test/path?a=1&a=2", ["my", "test", "path"], {"a": ["1", "2"]}),
    ("/my/test/path?a=1&b=2", ["my", "test", "path"], {"a": ["1"], "b": ["2"]}),
    ("/my/test/path?a=1&a=new%0aline", ["my", "test", "path"], {"a": ["1", "new\nline"]}),
    ("%2Fmy%2Ftest%2Fpath?a=1&a=new%0aline", ["my", "test", "path"], {"a": ["1", "new\nline"]}),
    ("//x/people", ["x", "people"], {}),
    ("//admin/dashboard", ["admin", "dashboard"], {}),
    ("//x/people?a=1", ["x", "people"], {"a": ["1"]}),
]


@pytest.mark.parametrize(("path", "parsed_path", "parsed_query"), PATH_CASES)
def test_parsed_path_and_query_as_upstream(
    path: str, parsed_path: list[str], parsed_query: dict[str, list[str]]
) -> None:
    doc = build_input(check_request({"path": path}))
    assert doc["parsed_path"] == parsed_path and doc["parsed_query"] == parsed_query


def test_attributes_as_upstream_protomap() -> None:
    """Test_protomap: populated fields only, JSON names, Struct metadata as plain JSON."""
    request_ = json_format.ParseDict(
        {
            "attributes": {
                "source": {
                    "address": {"socketAddress": {"address": "127.0.0.1"}},
                    "service": "dummy",
                    "labels": {"foo": "bar"},
                },
                "metadataContext": {"filterMetadata": {"dummy": {"hello": "world", "count": 1}}},
                "contextExtensions": {"hello": "world"},
                "request": {
                    "http": {
                        "id": "13359530607844510314",
                        "method": "GET",
                        "headers": {
                            ":authority": "192.168.99.100:31380",
                            ":method": "GET",
                            ":path": "/api/v1/products",
                            "accept": "*/*",
                        },
                        "path": "/api/v1/products",
                        "host": "192.168.99.100:31380",
                        "protocol": "HTTP/1.1",
                        "body": JSON_OBJECT,
                    }
                },
            }
        },
        external_auth_pb2.CheckRequest(),
    )
    assert build_input(request_)["attributes"] == {
        "source": {
            "service": "dummy",
            "labels": {"foo": "bar"},
            "address": {"socketAddress": {"address": "127.0.0.1"}},
        },
        "metadataContext": {"filterMetadata": {"dummy": {"hello": "world", "count": 1}}},
        "contextExtensions": {"hello": "world"},
        "request": {
            "http": {
                "id": "13359530607844510314",
                "method": "GET",
                "path": "/api/v1/products",
                "host": "192.168.99.100:31380",
                "protocol": "HTTP/1.1",
                "body": JSON_OBJECT,
                "headers": {
                    ":authority": "192.168.99.100:31380",
                    ":method": "GET",
                    ":path": "/api/v1/products",
                    "accept": "*/*",
                },
            }
        },
    }


def test_native_values_and_absent_fields_as_upstream_protomap() -> None:
    """protomap.go keeps native values: int64 and enums are numbers, a Timestamp is
    {seconds, nanos}, bytes are base64; zero scalars and empty maps are absent, a set but empty
    message is {}."""
    r = external_auth_pb2.CheckRequest()
    a = r.attributes
    a.request.time.seconds = 1_700_000_000
    a.request.time.nanos = 5
    h = a.request.http
    h.method, h.size, h.raw_body = "POST", 12, b"\x00\xff"
    h.header_map.headers.add(key="set-cookie", raw_value=b"a=1")
    a.source.address.socket_address.protocol = 1  # UDP
    a.source.address.socket_address.port_value = 53
    a.destination.SetInParent()
    a.tls_session.sni = "svc.local"
    doc = build_input(r)["attributes"]
    assert doc["request"]["time"] == {"seconds": 1_700_000_000, "nanos": 5}
    assert doc["request"]["http"] == {
        "method": "POST",
        "size": 12,
        "rawBody": "AP8=",
        "headerMap": {"headers": [{"key": "set-cookie", "rawValue": "YT0x"}]},
    }
    assert doc["source"] == {"address": {"socketAddress": {"protocol": 1, "portValue": 53}}}
    assert doc["destination"] == {}
    assert doc["tlsSession"] == {"sni": "svc.local"}
    assert "contextExtensions" not in doc and "metadataContext" not in doc
    assert "attributes" not in build_input(external_auth_pb2.CheckRequest())


@pytest.mark.parametrize(
    ("source", "principal"),
    [
        (None, None),  # TestSourcePeerAttributes, no source
        (
            {"service": "", "principal": "spiffe://test-domain/path", "certificate": ""},
            "spiffe://test-domain/path",
        ),
    ],
)
def test_source_principal_as_upstream(source: dict[str, str] | None, principal: str | None) -> None:
    extra = {"source": source} if source is not None else {}
    doc = build_input(
        check_request(
            {
                "headers": {"content-type": "application/grpc"},
                "method": "POST",
                "protocol": "HTTP/2",
                "path": "/com.book.BookService/GetBooksViaAuthor",
                "raw_body": "AAAAAAA=",
            },
            **extra,
        )
    )
    assert doc.get("source_principal") == principal


def test_version_and_whole_document_keys() -> None:
    """TestVersionInfoInputV3 and RequestToInput's keys."""
    doc = build_input(body_request("application/json", "{}"))
    assert doc["version"] == {"ext_authz": "v3", "encoding": "protojson"}
    assert set(doc) == {
        "attributes",
        "parsed_path",
        "parsed_query",
        "parsed_body",
        "truncated_body",
        "version",
    }


def test_skip_body_parse_leaves_both_body_keys_out() -> None:
    """TestCheckAllowDecisionWithSkipRequestBodyParse: even an invalid body is no error."""
    doc = build_input(
        body_request("application/json", '["foo" : 42}'), options=InputOptions(skip_body_parse=True)
    )
    assert "parsed_body" not in doc and "truncated_body" not in doc


def book_proto_set() -> ProtoSet:
    """upstream test/files/Book.proto, retyped: com.book.BookService.GetBooksViaAuthor(Author)."""
    file = descriptor_pb2.FileDescriptorProto(
        name="Book.proto", package="com.book", syntax="proto3"
    )
    author = file.message_type.add(name="Author")
    author.field.add(name="author", number=1, type=9, label=1)  # string
    book = file.message_type.add(name="Book")
    book.field.add(name="title", number=1, type=9, label=1)
    service = file.service.add(name="BookService")
    service.method.add(
        name="GetBooksViaAuthor",
        input_type=".com.book.Author",
        output_type=".com.book.Book",
        server_streaming=True,
    )
    service.method.add(
        name="StreamAuthors",
        input_type=".com.book.Author",
        output_type=".com.book.Book",
        client_streaming=True,
    )
    return ProtoSet(descriptor_pb2.FileDescriptorSet(file=[file]).SerializeToString())


def grpc_request(path: str | None, raw_b64: str | None) -> external_auth_pb2.CheckRequest:
    http: dict[str, Any] = {
        "headers": {"content-type": "application/grpc"},
        "method": "POST",
        "protocol": "HTTP/2",
    }
    if path is not None:
        http["path"] = path
    if raw_b64 is not None:
        http["raw_body"] = raw_b64
    return check_request(http)


BOOK = "/com.book.BookService/GetBooksViaAuthor"
# (upstream TestGetParsedBodygRPC case, path, raw_body, parsed_body, truncated_body)
GRPC_CASES = [
    ("without_raw_body", BOOK, None, None, False),
    ("valid_parsed_book", BOOK, "AAAAAAYKBEpvaG4=", {"author": "John"}, False),
    (
        "unknown_service",
        "/com.book.SecondBookService/GetBooksViaAuthor",
        "AAAAAAYKBEpvaG4=",
        None,
        False,
    ),
    (
        "unknown_method",
        "/com.book.BookService/GetBooksViaSecondAuthor",
        "AAAAAAYKBEpvaG4=",
        None,
        False,
    ),
    ("empty_request", BOOK, "AAAAAAA=", {}, False),
    (
        "compressed_payload",
        BOOK,
        "AQAAADwfiwgAAAAAAAD/4hLkaOi4t49RoOHi+ll//////59RSJCj4dGiE4wCDau/LIYIAQIAAP//aJ9RpSYAAAA=",
        None,
        False,
    ),
    ("truncated_payload", BOOK, "AAAAABEImqaMww==", None, True),
    (
        "(request.go) client-streaming method",
        "/com.book.BookService/StreamAuthors",
        "AAAAAAYKBEpvaG4=",
        None,
        False,
    ),
]


@pytest.mark.parametrize(
    ("path", "raw", "body", "truncated"),
    [c[1:] for c in GRPC_CASES],
    ids=[c[0] for c in GRPC_CASES],
)
def test_grpc_body_with_a_descriptor_set_as_upstream(
    path: str, raw: str | None, body: Any, truncated: bool
) -> None:
    doc = build_input(grpc_request(path, raw), options=InputOptions(proto_set=book_proto_set()))
    assert doc["parsed_body"] == body and doc["truncated_body"] is truncated


def test_grpc_body_errors_as_upstream() -> None:
    """parsed_path_error: a gRPC path that is not /service/method is a request error."""
    options = InputOptions(proto_set=book_proto_set())
    for request_ in (
        grpc_request(None, "AAAAAC0KDQoHCgVFUlJPUhICCAESHAoMCgpCb2R5IHZhbHVl"),
        grpc_request(BOOK, "AAA="),
    ):  # shorter than the frame header
        with pytest.raises(AuthzError) as err:
            build_input(request_, options=options)
        assert err.value.status == 400


def test_grpc_body_is_not_parsed_without_a_descriptor_set() -> None:
    doc = build_input(grpc_request(BOOK, "AAAAAAYKBEpvaG4="))
    assert doc["parsed_body"] is None and doc["truncated_body"] is False
