"""Draw a digit in the browser and watch the model read it: python app.py, then open http://127.0.0.1:8000/

A small local web app on Python's standard-library HTTP server (three routes and one page need no framework,
and nothing new to install). The page is static/index.html (plain HTML, CSS and JavaScript, nothing fetched
from the internet). Routes: GET / (the page), GET /health, POST /predict and POST /read_number (the raw bytes
of one picture in, JSON out; an error is {"error": "one line"} with a 4xx status): see docs/app.md.

The model is loaded once, as predict.py loads it, and every picture goes through preprocess as there. It
listens on 127.0.0.1 unless --host says otherwise; each request runs in its own thread, and a bad one gets its
error while the server goes on. Exit code: 0 after Ctrl-C, 2 for bad flags, an unusable checkpoint or an
address it cannot listen on.
"""
import base64
import io
import json
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

import number_reader
from checkpoint import CheckpointError, load_checkpoint, model_path_or_default
from common import PROJECT_DIR, OneLineParser, fail
from preprocess import ImageError, NoDigitError, SeveralDigitsError, image_to_mnist, mnist_to_image

PAGE = PROJECT_DIR / "static" / "index.html"
MAX_BODY = 5 * 1024 * 1024   # bytes: a phone photo fits, a flood does not
MAX_PIXELS = 50_000_000      # a 5 MB PNG can still unpack to gigabytes; refuse before decoding
REQUEST_TIMEOUT = 30         # seconds a connection may sit idle or trickle a body before it is dropped


def parse_args(argv=None):
    p = OneLineParser(prog="app.py", description=__doc__.splitlines()[0])
    p.add_argument("--model_path", help="checkpoint to use; without it results/best_model_simple_pt.pth, else the "
                   "newest results/best_model_*.pth, else the shipped pretrained/best_model_improved_pt.pth")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 lets other machines on your network use the page")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, printed at start)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (one picture at a time: the CPU "
                   "is plenty)")
    return p


class TooLarge(ImageError):
    """A picture whose pixels would not fit in memory comfortably, though its file is small."""


class Predictor:
    """The loaded model and its normalisation: picture bytes in, the JSON answer out. Safe to share by threads."""

    def __init__(self, model_path, device):
        self.model, self.ckpt = load_checkpoint(model_path, device)
        self.device, self.path = device, Path(model_path)
        self.mean, self.std = self.ckpt["normalization"]["mean"], self.ckpt["normalization"]["std"]
        self.reader = number_reader.load_reader()  # the shipped number reader, on the CPU (a line is small)
        self.cnn = number_reader.cnn_check(self.model, self.ckpt["normalization"], device)
        self.lock = threading.Lock()  # pictures are prepared in parallel; the forward pass goes one at a time

    def info(self):
        acc = self.ckpt.get("test_accuracy")
        return {"status": "ok", "model": self.ckpt["model"], "checkpoint": self.path.name,
                "test_accuracy": acc if isinstance(acc, float) else None, "device": str(self.device)}

    def predict(self, body):
        """Picture bytes -> the /predict answer. Raises ImageError (NoDigitError: no digit; SeveralDigitsError;
        TooLarge: too many pixels)."""
        x = image_to_mnist(self.open(body), self.mean, self.std)  # decodes it (big JPEGs at a reduced scale)
        with self.lock, torch.inference_mode():
            probs = self.model(x.unsqueeze(0).to(self.device)).float().softmax(1)[0].cpu().tolist()
        best = max(range(10), key=probs.__getitem__)
        png = io.BytesIO()
        mnist_to_image(x, self.mean, self.std).save(png, "PNG")
        return {"prediction": best, "confidence": round(probs[best], 6), "probabilities": [round(p, 6) for p in probs],
                "preprocessed": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode("ascii")}

    def read_number(self, body):
        """Picture bytes -> the /read_number answer (the same errors as predict, but for several digits)."""
        # prepared in parallel like a digit; the reader's forward pass (a few ms, a module in eval mode is safe to
        # share) is not under the lock, the digit CNN's is (classify)
        reading = number_reader.read_number(self.open(body), self.reader, classify=self.classify)
        return {"number": reading.number, "confidence": round(reading.confidence, 6), "lines": reading.numbers,
                "digits": [{"digit": d.digit, "probability": round(d.probability, 6), "box": list(d.box)}
                           for line in reading.lines for d in line]}

    def classify(self, pixels):
        """read_number's digit CNN (number_reader.cnn_check), one forward pass at a time."""
        with self.lock:
            return self.cnn(pixels)

    def open(self, body):
        """Picture bytes -> an opened (not yet decoded) PIL image, refused early when it has too many pixels."""
        try:
            img = Image.open(io.BytesIO(body))
        except UnidentifiedImageError:
            raise ImageError("not a picture (PNG, JPEG, BMP, GIF, TIFF or WebP)") from None
        except Image.DecompressionBombError:
            raise TooLarge(f"picture of too many pixels: at most {MAX_PIXELS // 1_000_000} megapixels") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"damaged picture ({' '.join(str(err).split())[:120]})") from None
        if img.width * img.height > MAX_PIXELS:
            raise TooLarge(f"picture of {img.width}x{img.height} pixels: at most {MAX_PIXELS // 1_000_000} megapixels")
        return img


class Handler(BaseHTTPRequestHandler):
    """The routes. Every answer has a Content-Length, so connections can be kept alive."""

    protocol_version = "HTTP/1.1"
    server_version = "mnist-app/1"
    timeout = REQUEST_TIMEOUT
    predictor = None  # set by make_server
    page = b""

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self.send_body(200, self.page, "text/html; charset=utf-8", [(
                "Content-Security-Policy",  # the page may talk to this server only, never to the internet
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'")])
        elif path == "/health":
            self.send_json(200, self.predictor.info())
        elif path in ("/predict", "/read_number"):
            self.send_json(405, {"error": "use POST with the picture's bytes as the body"}, [("Allow", "POST")])
        else:
            self.send_json(404, {"error": f"no page {path!r}: try / or /health"})

    do_HEAD = do_GET

    def do_POST(self):
        body = self.read_body()  # read (or refused and drained) first, whatever the path: the connection stays sane
        if body is None:
            return
        path = self.path.split("?", 1)[0]
        if path not in ("/predict", "/read_number"):
            self.send_json(405 if path in ("/", "/index.html", "/health") else 404,
                           {"error": "POST pictures to /predict or /read_number"})
            return
        started = time.perf_counter()
        try:
            answer = (self.predictor.predict if path == "/predict" else self.predictor.read_number)(body)
        except NoDigitError as err:
            self.send_json(422, {"error": "no digits found" if path == "/read_number" else str(err), "no_digit": True})
        except SeveralDigitsError as err:
            self.send_json(422, {"error": f"{err} (to read them as a number, POST the picture to /read_number)",
                                 "several_digits": True})
        except TooLarge as err:
            self.send_json(413, {"error": str(err)})
        except ImageError as err:
            self.send_json(400, {"error": str(err)})
        except Exception:  # a bug or a picture nobody foresaw: this request gets a 500, the server goes on
            traceback.print_exc()
            self.send_json(500, {"error": "internal error while reading this picture: see the server's log"})
        else:
            self.send_json(200, {**answer, "ms": round((time.perf_counter() - started) * 1000, 1)})

    def read_body(self):
        """The request body, or None after answering 400/411/413 (and draining what the client sends)."""
        length = self.headers.get("Content-Length")
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        if chunked or not (length or "").isdigit():  # 411: no length given; 400: a length that is no number
            self.close_connection = True
            self.send_json(411 if chunked or length is None else 400,
                           {"error": "send the picture with a Content-Length header (chunked bodies are not accepted)"})
            return None
        length = int(length)
        if length > MAX_BODY:
            self.refuse_too_large(length)
            return None
        if length == 0:
            self.send_json(400, {"error": "empty body: send the bytes of a picture (PNG, JPEG, ...)"})
            return None
        body = self.rfile.read(length)
        if len(body) < length:  # the client hung up half way
            self.close_connection = True
            return None
        return body

    def refuse_too_large(self, length):
        """413 without reading the body into memory; what the client is still sending is read and dropped.

        Closing a socket with unread data makes the kernel send a reset, which can destroy the 413 before the
        client reads it; so the answer goes first, then up to the announced length is drained (a 'lingering
        close', as nginx does), within a few seconds.
        """
        self.close_connection = True
        self.send_json(413, {"error": f"picture of {length / 2**20:.1f} MB: at most {MAX_BODY // 2**20} MB"})
        self.wfile.flush()
        deadline, left = time.monotonic() + 5.0, min(length, 8 * MAX_BODY)
        try:
            self.connection.settimeout(1.0)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def handle_expect_100(self):
        """`Expect: 100-continue` (curl, for big uploads): refuse an oversized body before it is sent."""
        length = self.headers.get("Content-Length", "0")
        if length.isdigit() and int(length) > MAX_BODY:
            self.close_connection = True
            self.send_json(413, {"error": f"picture of {int(length) / 2**20:.1f} MB: at most {MAX_BODY // 2**20} MB"})
            return False
        return super().handle_expect_100()

    def send_json(self, status, obj, extra=()):
        self.send_body(status, json.dumps(obj).encode(), "application/json", extra)

    def send_body(self, status, body, content_type, extra=()):
        self.send_response(status)
        for name, value in [("Content-Type", content_type), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"), *extra]:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, headers too long, ...) as JSON too."""
        self.close_connection = True
        try:
            self.send_json(code, {"error": message or HTTPStatus(code).phrase})
        except OSError:
            pass


class Server(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for idle keep-alive connections
    request_queue_size = 64

    def handle_error(self, request, client_address):
        """A client that hangs up or stalls is routine, not worth a traceback; anything else is printed."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def make_server(predictor, host="127.0.0.1", port=8000):
    """The HTTP server, listening but not yet serving (call .serve_forever())."""
    handler = type("AppHandler", (Handler,), {"predictor": predictor, "page": PAGE.read_bytes()})
    return Server((host, port), handler)


def main(argv=None):
    parser = parse_args(argv)
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    device = parser.device(args.device)
    try:
        model_path = model_path_or_default(args.model_path)
        predictor = Predictor(model_path, device)
    except CheckpointError as err:
        fail("app.py", err, 2)
    try:
        server = make_server(predictor, args.host, args.port)
    except OSError as err:
        fail("app.py", f"cannot listen on {args.host}:{args.port} ({err.strerror or err}); try another --port", 2)
    host, port = server.server_address[:2]
    acc = predictor.info()["test_accuracy"]
    print(f"model: {model_path} ({predictor.ckpt['model']}"
          f"{f', test accuracy {acc * 100:.2f}%' if acc is not None else ''}) on {device}", flush=True)
    print(f"serving on http://{f'[{host}]' if ':' in host else host}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped", flush=True)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
