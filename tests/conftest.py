import contextlib
import http.server
import threading

import numpy as np
import pytest

import minicnn


def pytest_configure(config):
    """Run the notebooks of notebooks/ (a testpath) when nbmake is installed, as ``--nbmake``
    would; tests/test_notebooks.py says so when it is not."""
    if config.pluginmanager.hasplugin("nbmake"):
        config.option.nbmake = True


@pytest.fixture(autouse=True)
def _fresh_state():
    """Every test starts from seed 0 and float32, whatever the test before it changed."""
    minicnn.seed(0)
    minicnn.set_default_dtype(np.float32)
    yield
    minicnn.set_default_dtype(np.float32)


@pytest.fixture
def float64():
    minicnn.set_default_dtype(np.float64)


def unique_values(rng, shape):
    """Random values with no ties (pooling tests: ties make argmax and finite differences disagree)."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) + rng.uniform(0.1, 0.4, size=shape)) / n


class _MirrorHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.server.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # /cut/ announces the whole file, sends half, then closes: a dropped connection.
        self.wfile.write(body[:len(body) // 2] if self.path.startswith("/cut/") else body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def mirror_server(files, extra_routes=None):
    """A download server on 127.0.0.1 for ``files`` (name -> bytes); yields its base URL.

    Mirrors: /good/ serves each file, /trunc/ its first half, /corrupt/ with 20 bytes flipped,
    /cut/ announces the full length and drops the connection halfway; anything else is a 404
    (so /missing/ is a mirror without the files). ``extra_routes`` adds paths -> bytes.
    """
    routes = dict(extra_routes or {})
    for name, data in files.items():
        routes[f"/good/{name}"] = data
        routes[f"/cut/{name}"] = data
        routes[f"/trunc/{name}"] = data[:len(data) // 2]
        routes[f"/corrupt/{name}"] = data[:20] + bytes(b ^ 0xFF for b in data[20:40]) + data[40:]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MirrorHandler)
    httpd.routes = routes
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def adam_step_float64(p, g, m, v, lr, b1, b2, eps, wd, t, decoupled):
    """Textbook Adam (AdamW with ``decoupled``), step t, on float64 copies -> (p, m, v)."""
    p, m, v, g = (np.array(a, np.float64) for a in (p, m, v, g))
    if decoupled:
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p, m, v
