"""Real servers on 127.0.0.1 for the object-storage tests and the data benchmark: an S3-compatible server (moto's
ThreadedMotoServer), an HTTP file server that answers Range requests, and a TCP proxy that injects seeded faults
(connection resets mid-response and stalls) between a client and either of them."""

from __future__ import annotations

import contextlib
import random
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def start_s3() -> tuple[object, str]:
    """(server, endpoint URL) of a moto S3 server on a free loopback port; `server.stop()` ends it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def s3_environment(endpoint: str) -> dict[str, str]:
    """The standard variables that boto3 and s3fs read (moto accepts any key)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "loopback-key-id",
            "AWS_SECRET_ACCESS_KEY": "loopback-secret-never-logged", "AWS_DEFAULT_REGION": "us-east-1"}


def upload_folder(endpoint: str, folder: Path, bucket: str, prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="loopback-key-id",
                          aws_secret_access_key="loopback-secret-never-logged", region_name="us-east-1")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    for file in sorted(Path(folder).iterdir()):
        if file.is_file():
            client.upload_file(str(file), bucket, f"{prefix}/{file.name}")


class _RangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        self.server.requests += 1
        path = Path(self.server.root) / self.path.split("?", 1)[0].lstrip("/")
        if not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = path.stat().st_size
        start, end = 0, size
        found = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if found:
            start, end = int(found[1]), min(size, int(found[2]) + 1 if found[2] else size)
        self.send_response(206 if found else 200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if found:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if body:
            with open(path, "rb") as handle:
                handle.seek(start)
                self.wfile.write(handle.read(end - start))


def start_http(root: Path) -> tuple[ThreadingHTTPServer, str]:
    """(server, base URL) of a Range-capable file server for `root`; `server.requests` counts requests."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    server.root, server.requests, server.daemon_threads = str(root), 0, True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class FaultProxy:
    """Forwards 127.0.0.1:`port` to `target`; each chunk of a response is cut by a connection reset with
    probability `reset`, and each new connection stalls `stall_s` seconds before answering with probability
    `stall`. The draws come from one generator seeded with `seed`; `faults` counts what was injected."""

    def __init__(self, target: str, seed: int = 0, reset: float = 0.0, stall: float = 0.0, stall_s: float = 3.0):
        host, port = target.rsplit("//", 1)[-1].split(":")
        self.target = (host, int(port))
        self.random, self.lock = random.Random(seed), threading.Lock()
        self.reset, self.stall, self.stall_s = reset, stall, stall_s
        self.faults = {"reset": 0, "stall": 0}
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _draw(self, probability: float, kind: str) -> bool:
        with self.lock:
            hit = self.random.random() < probability
            self.faults[kind] += hit
        return hit

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        stall = self._draw(self.stall, "stall")
        threading.Thread(target=self._pump, args=(client, upstream, False, False), daemon=True).start()
        self._pump(upstream, client, True, stall)

    def _pump(self, source: socket.socket, sink: socket.socket, response: bool, stall: bool) -> None:
        try:
            while data := source.recv(65536):
                if stall:
                    time.sleep(self.stall_s)
                    stall = False
                if response and self._draw(self.reset, "reset"):
                    sink.sendall(data[: len(data) // 2])
                    sink.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.close()

    def close(self) -> None:
        self.listener.close()
