"""The served /openapi.json tells clients the truth: the error statuses and the error body the
routes answer, the upload as a required binary file, and 405s that name the path's methods."""
from __future__ import annotations

import pytest

from tests.service.images import png_bytes

IMAGE_ROUTES = ("/v1/upscale", "/v1/degradation", "/v1/jobs")


@pytest.fixture(scope="module")
def schema(server):
    with server.client() as client:
        return client.get("/openapi.json").json()


def resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def test_every_error_status_has_the_error_body_and_fastapis_422_body_is_gone(schema):
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    body = resolve(schema, response["content"]["application/json"]["schema"])
                    assert body["required"] == ["error"], (method, path, status)
                    detail = resolve(schema, body["properties"]["error"])
                    assert set(detail["required"]) == {"code", "message"}, (method, path, status)
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # FastAPI's 422 body, never sent


# Requests that provoke an error, the route's path template, and the status they must get: each
# answer must be one its operation documents.
PROVOKED = [
    ("POST", "/v1/upscale", "/v1/upscale", {"content": b""}, 400),
    ("POST", "/v1/upscale", "/v1/upscale", {"content": b"x", "headers": {"content-type": "text/plain"}}, 415),
    ("POST", "/v1/upscale", "/v1/upscale", {"content": png_bytes(8, 8), "params": {"noise": "nan"}}, 422),
    ("POST", "/v1/upscale", "/v1/upscale", {"content": b"GIF89a not really"}, 400),
    ("POST", "/v1/degradation", "/v1/degradation", {"content": png_bytes(8, 8), "params": {"noise": "0.5"}}, 422),
    ("POST", "/v1/degradation", "/v1/degradation", {"content": b"x", "headers": {"content-type": "text/csv"}}, 415),
    ("POST", "/v1/jobs", "/v1/jobs", {"content": png_bytes(8, 8), "params": {"scale": "99"}}, 422),
    ("POST", "/v1/jobs", "/v1/jobs", {"content": b""}, 400),
    ("GET", "/v1/jobs/unknown", "/v1/jobs/{job_id}", {}, 404),
    ("GET", "/v1/jobs/unknown/result", "/v1/jobs/{job_id}/result", {}, 404),
    ("DELETE", "/v1/jobs/unknown", "/v1/jobs/{job_id}", {}, 404),
]


@pytest.mark.parametrize("method, path, template, request_args, status", PROVOKED)
def test_the_errors_a_route_answers_are_documented(schema, client, method, path, template, request_args, status):
    response = client.request(method, path, **request_args)
    assert response.status_code == status, response.text
    assert str(status) in schema["paths"][template][method.lower()]["responses"]


def test_upscale_documents_its_image_types_and_the_frames_header(schema, client):
    ok = schema["paths"]["/v1/upscale"]["post"]["responses"]["200"]
    served = client.post("/v1/upscale", content=png_bytes(8, 8), params={"format": "webp"})
    assert served.headers["content-type"] in ok["content"]


@pytest.mark.parametrize("path", IMAGE_ROUTES)
def test_the_image_field_is_a_required_binary_file(schema, path):
    content = schema["paths"][path]["post"]["requestBody"]["content"]
    form = resolve(schema, content["multipart/form-data"]["schema"])
    assert "image" in form["required"]
    assert form["properties"]["image"]["type"] == "string" and form["properties"]["image"]["format"] == "binary"
    assert {"image/png", "image/jpeg", "image/webp"} <= set(content)  # or the raw image as the body


@pytest.mark.parametrize("path", IMAGE_ROUTES)
def test_an_image_field_that_is_not_a_file_is_a_json_400(client, path):
    response = client.post(path, files={"image": (None, "null")})  # a text part, no filename
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "missing_image"


def test_form_fields_are_documented_and_still_override_the_query(schema, client):
    form = schema["paths"]["/v1/upscale"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["format"]["enum"] == ["png", "jpeg", "webp"]  # a form field is never null
    response = client.post("/v1/upscale", params={"format": "png"},
                           files={"image": ("in.png", png_bytes(8, 8), "image/png")}, data={"format": "webp"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/webp"


@pytest.mark.parametrize("method, path, allowed", [
    ("PUT", "/v1/jobs/some-id", "DELETE, GET"),  # two routes share the path
    ("GET", "/v1/upscale", "POST"),
    ("POST", "/healthz", "GET"),
])
def test_a_405_names_every_method_of_the_path(schema, client, method, path, allowed):
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["allow"] == allowed
    assert {m.upper() for m in schema["paths"][path.replace("some-id", "{job_id}")]} == set(allowed.split(", "))
