"""The service over real HTTP (uvicorn on 127.0.0.1): concurrent clients, the OpenAPI schema
fuzzed with schemathesis, and the ``cliplab serve`` command."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service needs fastapi and uvicorn: pip install 'cliplab[serve]'")
httpx = pytest.importorskip("httpx", reason="the service tests need httpx (the 'test' extra)")

from _serve import KEY, png

from cliplab.cli.main import main
from cliplab.errors import UsageError
from cliplab.serve import bind, check_auth, is_loopback

H = {"X-API-Key": KEY}


def test_concurrent_requests_are_batched_without_error(live, tiny):
    texts = [f"a photo of {n} red circles" for n in range(64)]
    want = tiny.encode_texts(texts)
    before = live.service.text.stats()["calls"]
    errors, results = [], {}

    def client(worker: int):
        with httpx.Client(base_url=live.url, headers=H, timeout=60) as c:
            for j in range(4):                              # 16 threads x 4 requests
                i = worker * 4 + j
                try:
                    r = c.post("/v1/embed/text", json={"texts": [texts[i]]})
                    r.raise_for_status()
                    results[i] = r.json()["embeddings"][0]
                except Exception as e:  # noqa: BLE001 - every failure is reported below
                    errors.append(f"{i}: {e!r}")

    threads = [threading.Thread(target=client, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert len(results) == 64
    np.testing.assert_allclose(np.array([results[i] for i in range(64)]), want, atol=1e-5)
    stats = httpx.get(live.url + "/v1/stats", headers=H).json()["text"]
    assert stats["calls"] - before < 64                     # fewer model calls than requests
    assert max(int(b) for b in stats["sizes"]) > 1          # some calls served several requests


def test_concurrent_images_and_classification(live):
    errors = []
    data = png((30, 200, 30))

    def client(worker: int):
        with httpx.Client(base_url=live.url, headers=H, timeout=60) as c:
            for _ in range(2):
                try:
                    r = c.post("/v1/classify", files={"image": ("g.png", data, "image/png")},
                               data={"labels": "red circle, green circle"}) if worker % 2 else \
                        c.post("/v1/search/image", files={"image": ("g.png", data, "image/png")}, data={"k": "3"})
                    r.raise_for_status()
                except Exception as e:  # noqa: BLE001
                    errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors


def test_openapi_schema_fuzzed_without_server_errors(live):
    """Every operation of the OpenAPI schema, with generated (valid and invalid) inputs: no 5xx."""
    hypothesis = pytest.importorskip("hypothesis")
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/embed/text", "/v1/embed/image", "/v1/classify",
                                             "/v1/search/text", "/v1/search/image", "/v1/files/{id}"}
    failures = []
    for op in operations:
        @hypothesis.settings(max_examples=8, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        @hypothesis.given(case=op.as_strategy())
        def fuzz(case):
            response = case.call(base_url=live.url, headers=H, timeout=60)
            if response.status_code >= 500:
                failures.append(f"{op.method.upper()} {op.path}: {response.status_code} {response.text[:200]}")
            case.validate_response(response, checks=[not_a_server_error])

        fuzz()
    assert not failures


def test_check_auth_rules(monkeypatch):
    monkeypatch.delenv("CLIPLAB_API_KEY", raising=False)
    assert check_auth("0.0.0.0", "k", False) == "k"
    assert check_auth("127.0.0.1", None, True) is None
    monkeypatch.setenv("CLIPLAB_API_KEY", "from-env")
    assert check_auth("0.0.0.0", None, False) == "from-env"
    monkeypatch.delenv("CLIPLAB_API_KEY")
    with pytest.raises(UsageError, match="no API key"):
        check_auth("127.0.0.1", None, False)
    for host in ("0.0.0.0", "192.168.1.5", "example.org", "::"):
        with pytest.raises(UsageError, match="only allowed on a loopback"):
            check_auth(host, None, True)
    with pytest.raises(UsageError, match="contradict"):
        check_auth("127.0.0.1", "k", True)
    assert all(map(is_loopback, ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost")))


@pytest.mark.parametrize("argv, message", [
    (["serve", "--host", "0.0.0.0", "--no-auth"], "only allowed on a loopback host"),
    (["serve"], "no API key"),
])
def test_cli_refuses_without_key(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("CLIPLAB_API_KEY", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_port_in_use(capsys):
    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert main(["serve", "--no-auth", "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        sock.close()


def test_cli_refuses_index_of_another_model(index_dir, capsys):
    # the bundled model is not the tiny one the index was built with
    assert main(["serve", "--no-auth", "--port", "0", "--index", str(index_dir)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_serves(tiny_dir, index_dir, monkeypatch, capsys):
    """``cliplab serve`` (in a thread of this process): announces its address, needs the key,
    answers a search, and returns 0 when the server stops."""
    import functools
    import time

    import cliplab.serve

    box: list = []
    monkeypatch.setattr(cliplab.serve, "run", functools.partial(cliplab.serve.run, server_box=box))
    monkeypatch.setenv("CLIPLAB_API_KEY", KEY)
    rc: list = []
    thread = threading.Thread(target=lambda: rc.append(main(["serve", "--model", str(tiny_dir), "--index",
                                                              str(index_dir), "--port", "0"])), daemon=True)
    thread.start()
    for _ in range(600):                                    # at most 60 s
        if (box and box[0].started) or not thread.is_alive():
            break
        time.sleep(0.1)
    try:
        assert box and box[0].started, capsys.readouterr().err
        url = re.search(r"http://127\.0\.0\.1:\d+", capsys.readouterr().err)
        assert url
        url = url.group(0)
        assert httpx.get(url + "/ready", timeout=30).json()["ready"] is True
        assert httpx.post(url + "/v1/search/text", json={"text": "red", "k": 2}, timeout=30).status_code == 401
        r = httpx.post(url + "/v1/search/text", json={"text": "red", "k": 2}, headers=H, timeout=30)
        assert r.status_code == 200 and len(r.json()["hits"]) == 2
    finally:
        if box:
            box[0].should_exit = True
        thread.join(timeout=30)
    assert rc == [0]
