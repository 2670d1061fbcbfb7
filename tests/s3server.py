"""A real S3 API for the tests: moto's server mode on a free loopback port, started and stopped by the tests.

s3fs and boto3 reach it through `AWS_ENDPOINT_URL`, as they would reach MinIO, Ceph or R2; child processes
(`i2v ...` run as a command) inherit the variables.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

KEYS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        return {**KEYS, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_boto_keys())


def _boto_keys() -> dict[str, str]:
    return {
        "aws_access_key_id": KEYS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"],
        "region_name": KEYS["AWS_DEFAULT_REGION"],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_s3(extra_env: dict[str, str] | None = None) -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1; stopped (and its data gone) when the block ends."""
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint + "/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        yield S3Server(endpoint, proc)
    finally:
        proc.terminate()
        proc.wait(10)


def use(server: S3Server) -> None:
    """Point this process (and its children) at `server`, and forget filesystems cached for another endpoint."""
    os.environ.update(server.env())
    forget_filesystems()


def forget_filesystems() -> None:
    import fsspec

    with contextlib.suppress(ImportError):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    fsspec.AbstractFileSystem.clear_instance_cache()


class CuttingProxy:
    """A TCP proxy to the S3 server that cuts connections: `cut_responses` answers are cut after `after` bytes.

    It stands for a network that drops: a body cut mid-stream (reads) or a connection reset mid-request
    (uploads, with `cut_requests`). `endpoint` is what AWS_ENDPOINT_URL should name.
    """

    def __init__(self, target: str, after: int = 65536, cut_responses: int = 0, cut_requests: int = 0):
        import threading

        self.target = target.rsplit(":", 1)
        self.after, self.cut_responses, self.cut_requests = after, cut_responses, cut_requests
        self.cuts = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _take(self, kind: str) -> bool:
        with self._lock:
            left = getattr(self, kind)
            if left > 0:
                setattr(self, kind, left - 1)
                self.cuts += 1
                return True
            return False

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        import threading

        host, port = self.target[0].split("//")[-1], int(self.target[1])
        upstream = socket.create_connection((host, port))

        def pipe(src: socket.socket, dst: socket.socket, kind: str) -> None:
            sent, cut = 0, False
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    if not cut and sent + len(data) > self.after and self._take(kind):
                        dst.sendall(data[: max(0, self.after - sent)])
                        break
                    dst.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

        threading.Thread(target=pipe, args=(client, upstream, "cut_requests"), daemon=True).start()
        pipe(upstream, client, "cut_responses")

    def close(self) -> None:
        self._server.close()
