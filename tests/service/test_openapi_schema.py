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


def test_upscale_documents_its_error_statuses_with_the_error_body(schema):
    responses = schema["paths"]["/v1/upscale"]["post"]["responses"]
    assert set(responses) == {"200", "400", "401", "413", "415", "422", "429", "499", "500", "503", "504"}
    assert set(responses["200"]["content"]) == {"image/png", "image/jpeg", "image/webp"}
    for status, response in responses.items():
        if status != "200":
            body = resolve(schema, response["content"]["application/json"]["schema"])
            assert body["required"] == ["error"], status
            detail = resolve(schema, body["properties"]["error"])
            assert set(detail["required"]) == {"code", "message"}, status
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # FastAPI's 422 body, never sent


def test_every_operation_documents_its_error_statuses(schema):
    documented = {(method.upper(), path): set(operation["responses"])
                  for path, operations in schema["paths"].items() for method, operation in operations.items()}
    assert documented[("POST", "/v1/jobs")] == {"202", "400", "401", "413", "415", "422", "429", "503"}
    assert documented[("GET", "/v1/jobs/{job_id}/result")] == {"200", "401", "404", "409", "422"}
    assert documented[("POST", "/v1/degradation")] == {"200", "400", "401", "413", "415", "429", "499", "500", "503",
                                                        "504"}
    assert documented[("GET", "/v1/model")] == {"200", "401", "503"}
    assert documented[("GET", "/readyz")] == {"200", "503"}


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
