"""The service's endpoints in process (starlette's TestClient): results, auth, limits and 4xx errors."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service needs fastapi and uvicorn: pip install 'cliplab[serve]'")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx (the 'test' extra)")

from _serve import COLOURS, KEY, brute_force, png

from cliplab.errors import UsageError

H = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def client(tiny, index_dir):
    from fastapi.testclient import TestClient

    from cliplab.serve import ServeSettings, create_app

    settings = ServeSettings(api_key=KEY, max_body_bytes=200_000, max_pixels=100_000, max_labels=5, max_texts=4)
    with TestClient(create_app(tiny, index=index_dir, settings=settings)) as c:
        yield c


@pytest.fixture(scope="module")
def open_client(tiny):
    """No key, no index."""
    from fastapi.testclient import TestClient

    from cliplab.serve import create_app

    with TestClient(create_app(tiny)) as c:
        yield c


def test_health_ready_info(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"ready": True, "queued": 0}
    info = client.get("/v1/info").json()
    assert info["auth"] is True and info["index"]["size"] == len(COLOURS)
    assert info["limits"]["max_labels"] == 5 and "api_key" not in info["limits"]


@pytest.mark.parametrize("method, path, kw", [
    ("post", "/v1/embed/text", {"json": {"texts": ["a"]}}),
    ("post", "/v1/search/text", {"json": {"text": "a"}}),
    ("post", "/v1/embed/image", {"files": {"image": ("a.png", png(), "image/png")}}),
    ("get", "/v1/stats", {}),
    ("get", "/v1/files/0", {}),
])
@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}])
def test_auth_refused(client, method, path, kw, headers):
    r = getattr(client, method)(path, headers=headers, **kw)
    assert r.status_code == 401
    assert "API key" in r.json()["detail"]


def test_bearer_key_accepted(client):
    r = client.post("/v1/embed/text", json={"texts": ["a"]}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200


def test_embed_text_matches_the_model(client, tiny):
    texts = ["a red circle", "two blue squares"]
    r = client.post("/v1/embed/text", json={"texts": texts}, headers=H)
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == tiny.name and body["dim"] == tiny.embed_dim
    np.testing.assert_allclose(np.array(body["embeddings"]), tiny.encode_texts(texts), atol=1e-5)


def test_embed_image_matches_the_model(client, tiny, image_folder):
    path = image_folder / "red.png"
    r = client.post("/v1/embed/image", files={"image": ("red.png", path.read_bytes(), "image/png")}, headers=H)
    assert r.status_code == 200
    np.testing.assert_allclose(np.array(r.json()["embedding"]), tiny.encode_images([path]).features[0], atol=1e-5)


def test_classify_matches_zero_shot(client, tiny, image_folder):
    from cliplab.zeroshot import ZeroShotClassifier

    labels = ["red circle", "green circle", "blue circle"]
    path = image_folder / "green.png"
    r = client.post("/v1/classify", files={"image": ("g.png", path.read_bytes(), "image/png")},
                    data={"labels": ", ".join(labels), "k": "3"}, headers=H)
    assert r.status_code == 200
    got = {d["label"]: d["prob"] for d in r.json()["labels"]}
    want = ZeroShotClassifier(tiny, labels).predict_proba([path])[0]
    assert got == pytest.approx(dict(zip(labels, want.tolist())), abs=1e-5)
    assert [d["prob"] for d in r.json()["labels"]] == sorted(got.values(), reverse=True)


def test_search_text_equals_brute_force(client, tiny, image_folder):
    paths = sorted(str(p) for p in image_folder.glob("*.png"))
    feats = tiny.encode_images(paths).features
    q = tiny.encode_texts(["a yellow circle"])[0]
    r = client.post("/v1/search/text", json={"text": "a yellow circle", "k": 3}, headers=H)
    assert r.status_code == 200
    hits = r.json()["hits"]
    assert [h["path"] for h in hits] == [paths[i] for i in brute_force(feats, q, 3)]
    assert [h["score"] for h in hits] == pytest.approx((feats @ q)[brute_force(feats, q, 3)].tolist(), abs=1e-4)
    assert all(h["url"] == f"/v1/files/{h['id']}" for h in hits)
    assert all(isinstance(h["metadata"], dict) for h in hits)


def test_search_image_finds_itself(client, image_folder):
    data = (image_folder / "blue.png").read_bytes()
    r = client.post("/v1/search/image", files={"image": ("q.png", data, "image/png")}, data={"k": "2"}, headers=H)
    assert r.status_code == 200
    hits = r.json()["hits"]
    assert len(hits) == 2 and hits[0]["path"].endswith("blue.png") and hits[0]["score"] == pytest.approx(1, abs=1e-4)


def test_files_only_hits_of_a_search(tiny, index_dir):
    from fastapi.testclient import TestClient

    from cliplab.serve import ServeSettings, create_app

    with TestClient(create_app(tiny, index=index_dir, settings=ServeSettings(api_key=KEY))) as client:
        _check_files(client)


def _check_files(client):
    hits = client.post("/v1/search/text", json={"text": "red", "k": 2}, headers=H).json()["hits"]
    r = client.get(hits[0]["url"], headers=H)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == open(hits[0]["path"], "rb").read()
    returned = {h["id"] for h in hits}
    other = next(i for i in range(len(COLOURS)) if i not in returned)
    assert client.get(f"/v1/files/{other}", headers=H).status_code == 404      # indexed, but never returned
    for bad in ("..%2F..%2Fetc%2Fpasswd", "-1", "0/../../x", "%2Fetc%2Fpasswd"):
        assert client.get(f"/v1/files/{bad}", headers=H).status_code in (404, 422)
    assert client.get("/static/..%2Fapp.py").status_code == 404


def test_bad_json_is_400(client):
    for body in (b"{not json", b'{"texts": ["a"]', b"\xff\xfe"):
        r = client.post("/v1/embed/text", content=body, headers={**H, "Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert "not valid JSON" in r.json()["detail"]


@pytest.mark.parametrize("body, field", [
    ({"texts": []}, "texts"),
    ({"texts": ["a"] * 5}, "texts"),            # max_texts = 4
    ({"texts": ["a" * 1001]}, "texts"),         # max_text_chars = 1000
    ({"texts": "a"}, "texts"),
    ({}, "texts"),
])
def test_invalid_body_is_422_naming_the_field(client, body, field):
    r = client.post("/v1/embed/text", json=body, headers=H)
    assert r.status_code == 422
    assert r.json()["detail"].startswith(field)


def test_bad_image_is_400(client):
    for data in (b"", b"not an image at all", png()[:60]):
        r = client.post("/v1/embed/image", files={"image": ("x.png", data, "image/png")}, headers=H)
        assert r.status_code == 400, r.text
        assert r.json()["detail"].startswith("cannot read the image:")


def test_too_many_pixels_is_400(client):
    r = client.post("/v1/embed/image", files={"image": ("big.png", png(size=(400, 300)), "image/png")}, headers=H)
    assert r.status_code == 400
    assert "exceeds the limit of 100,000 pixels" in r.json()["detail"]


def test_oversized_body_is_413(client):
    big = b"x" * 300_000                                       # max_body_bytes = 200,000
    r = client.post("/v1/embed/image", files={"image": ("x.png", big, "image/png")}, headers=H)
    assert r.status_code == 413 and "over the limit of 200,000 bytes" in r.json()["detail"]

    def chunks():                                              # no Content-Length: counted as it streams
        for _ in range(6):
            yield b"x" * 50_000

    r = client.post("/v1/embed/text", content=chunks(), headers={**H, "Content-Type": "application/json"})
    assert r.status_code == 413


def test_labels_limits(client):
    data = png()

    def classify(labels):
        return client.post("/v1/classify", files={"image": ("a.png", data, "image/png")}, data={"labels": labels},
                           headers=H)

    r = classify("a, b, c, d, e, f")                           # max_labels = 5
    assert r.status_code == 422 and "at most 5" in r.json()["detail"]
    assert classify(" , ,").status_code == 422
    r = classify("red circle, Red  circle")
    assert r.status_code == 422 and "same prompts" in r.json()["detail"]
    assert classify("a, b, c, d, e").status_code == 200


def test_stats_count_batches(client):
    stats = client.get("/v1/stats", headers=H).json()
    assert set(stats) == {"text", "image"}
    assert stats["text"]["requests"] == sum(int(b) * n for b, n in stats["text"]["sizes"].items())


def test_no_key_no_index(open_client):
    assert open_client.post("/v1/embed/text", json={"texts": ["a"]}).status_code == 200
    r = open_client.post("/v1/search/text", json={"text": "a"})
    assert r.status_code == 404 and "--index" in r.json()["detail"]
    assert open_client.get("/v1/info").json()["index"] is None


def test_page_and_security_headers(open_client):
    r = open_client.get("/")
    assert r.status_code == 200 and "<title>cliplab search</title>" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert open_client.get(f"/static/{name}").status_code == 200
    assert "http" not in r.text.replace("http-equiv", "")     # nothing loaded from elsewhere
    assert open_client.get("/docs").status_code == 404         # Swagger UI would load a CDN


def test_index_of_another_model_is_refused(index_dir):
    import cliplab
    from cliplab.serve import create_app

    other = cliplab.load("shapes-tiny")
    with pytest.raises(UsageError):
        create_app(other, index=index_dir)


def test_settings_are_checked():
    from cliplab.serve import ServeSettings

    with pytest.raises(UsageError):
        ServeSettings(max_batch=0)
    with pytest.raises(UsageError):
        ServeSettings(api_key=" ")
