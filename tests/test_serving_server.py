"""The HTTP server: a burst of concurrent requests mixing two fine-tunes and the base plus bad requests,
through a real HTTP client (urllib) to a real server on a free localhost port; ``prinmix serve`` shuts
down cleanly on SIGTERM."""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from pipeline_fixtures import jax_cache_env, make_pair
from test_serving import fixture_paths, make_bank, reference  # noqa: F401 -- session fixtures of test_serving


def _request(url, body=None, method=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def _serve_in_thread(app):
    """uvicorn on a free localhost port in a thread: ``(url, stop)``."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join(30)

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def test_burst_of_mixed_requests_and_errors(fixture_paths, reference):  # noqa: F811
    base_p, cfg, merged = reference
    from prinmix_jax.evaluation import greedy_generate
    from prinmix_jax.serving.server import bank_tokenizer, make_app

    tok = bank_tokenizer(fixture_paths["base"])
    url, stop = _serve_in_thread(make_app(make_bank(fixture_paths), tok, "tiny-base", batch_window=0.5))
    try:
        status, models, _ = _request(url + "/v1/models")
        assert status == 200 and {m["id"] for m in models["data"]} == {"tiny-base", "a", "b", "c"}
        prompts = ["the quick brown fox", "a lazy dog while"]
        good = [(m, p) for p in prompts for m in ("a", "b", "tiny-base")]
        bad = [({"model": "nope", "prompt": "the"}, 404, "model"),
               (b'{"model": "a", "prompt": ', 400, None),
               ({"model": "a", "prompt": "the " * 70, "max_tokens": 4}, 400, "prompt"),
               ({"model": "b", "prompt": "the", "max_tokens": -3}, 400, "max_tokens")]
        bodies = [{"model": m, "prompt": p, "max_tokens": 10, "temperature": 0} for m, p in good]
        with ThreadPoolExecutor(len(bodies) + len(bad)) as pool:
            answers = list(pool.map(lambda b: _request(url + "/v1/completions", b), bodies + [b for b, _, _ in bad]))
        rows = []
        for (m, p), (status, body, headers) in zip(good, answers):
            assert status == 200, body
            want = greedy_generate(base_p if m == "tiny-base" else merged[m], cfg, [tok.encode(p)], 10,
                                   eos_id=tok.eos_id)[0]
            assert body["model"] == m and body["choices"][0]["text"] == tok.decode(want), (m, p)
            assert body["usage"]["completion_tokens"] == len(want)
            rows.append(int(headers["x-prinmix-batch-rows"]))
        assert max(rows) > 1                      # requests that arrived together shared a batch
        assert len({a[1]["choices"][0]["text"] for a in answers[:3]}) == 3
        for (_, code, param), (status, body, _) in zip(bad, answers[len(good):]):
            assert status == code and body["error"]["param"] == param and body["error"]["message"], body
        status, body, _ = _request(url + "/v1/completions", bodies[1])       # still serving
        assert status == 200 and body["choices"] == answers[1][1]["choices"]
        assert _request(url + "/v1/models", b"{}", method="POST")[0] == 405
    finally:
        stop()


def test_serve_command_stops_cleanly_on_sigterm(tmp_path_factory):
    base, _ = make_pair(tmp_path_factory.mktemp("serve"), "llama", layers=1)
    cmd = [sys.executable, "-m", "prinmix_jax.cli", "serve", base, "--base-name", "b0", "--port", "0"]
    proc = subprocess.Popen(cmd, env=jax_cache_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not (lines and " on http://" in lines[-1]):
            lines.append(proc.stderr.readline())
            assert lines[-1] or proc.poll() is None, "".join(lines)
        url = lines[-1].rsplit(" on ", 1)[1].strip()
        assert lines[-1].startswith("serving b0 on ")
        assert lines[-2].startswith("device memory: base ") and "0 delta(s)" in lines[-2], lines
        assert _request(url + "/v1/models")[1]["data"][0]["id"] == "b0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
