"""A real S3 API server on loopback, for the tests, benchmarks and evaluations: moto's server in a child
process on 127.0.0.1.

The server is a real S3 API (HTTP, SigV4-signed requests, ETags, conditional requests, IAM when it is
turned on) that keeps every object in the child's memory, so what it measures is the request and
protocol overhead of object storage, not a network or a disk. It runs in its own process (its own
interpreter lock, as a real service would be) on a port the OS picks (printed back by the child: no
race for a port) and counts what it answers: requests by method and the bytes of request and response
bodies, read back with `LoopbackS3.stats` (served by the child itself at ``/_loopback/stats``,
outside the S3 API); with a log file, also one line per request (``METHOD STATUS PATH``).
Authentication is off (any key is accepted) until `LoopbackS3.require_auth`; tests/s3_server.py
turns it on with a writer and a read-only user.

lenscache reaches the server the way a user's program reaches any S3-compatible service: through the
standard AWS environment variables (`LoopbackS3.env`), which botocore (and so s3fs) reads.

    python -m lenscache.tools.s3_loopback     # prints the endpoint and AWS variables; stops on EOF (Ctrl-D)

Needs moto's server: ``pip install 'moto[server]'`` (the test extra has it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lenscache.errors import LensCacheError

REGION = "us-east-1"
KEY = ("testing", "testing")  # moto without authentication accepts any key
STATS_PATH = "/_loopback/stats"
# every variable that could carry another identity or endpoint into this process or a child
AWS_VARS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3")  # fmt: skip
Identity = str | tuple[str, str]  # a name in LoopbackS3.keys, or a (key id, secret) pair


def _canonical_query(path: str) -> str:
    """`path` with its query string in the canonical form a SigV4 client signs (RFC 3986 quoting).

    moto's server receives the query string re-quoted by werkzeug ('/' in a value arrives bare) and
    checks the signature against that, so with authentication on every signed request with a '/' in a
    query value (a listing by prefix) fails with SignatureDoesNotMatch (getmoto/moto#5948).
    """
    from urllib.parse import quote, unquote

    base, sep, query = path.partition("?")
    pairs = (p.partition("=") for p in query.split("&")) if sep else ()
    fixed = "&".join(quote(unquote(k), safe="-_.~") + e + quote(unquote(v), safe="-_.~") for k, e, v in pairs)
    return base + sep + fixed


def serve(log_path: str | None = None) -> None:
    """The child: serve moto's S3 on 127.0.0.1 (a free port, printed first), counting requests (and
    logging each to `log_path`); stop on EOF."""
    import logging
    import threading

    import moto.iam.access_control as access
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
    init = access.IAMRequestBase.__init__

    def canonical_init(self, *args, path, **kwargs):
        init(self, *args, path=_canonical_query(path), **kwargs)

    access.IAMRequestBase.__init__ = canonical_init
    app = DomainDispatcherApplication(create_backend_app)
    counts: dict = {"requests": 0, "by_method": {}, "bytes_in": 0, "bytes_out": 0}
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115 (open while serving)

    def body_of(environ, start_response) -> Iterator[bytes]:
        out = 0
        for part in app(environ, start_response):
            out += len(part)
            yield part
        with lock:
            counts["bytes_out"] += out

    def counted(environ, start_response):
        if environ.get("PATH_INFO") == STATS_PATH:
            with lock:
                body = json.dumps(counts).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        method = environ["REQUEST_METHOD"]
        with lock:
            counts["requests"] += 1
            counts["by_method"][method] = counts["by_method"].get(method, 0) + 1
            counts["bytes_in"] += int(environ.get("CONTENT_LENGTH") or 0)

        def respond(status, headers, exc_info=None):
            if log is not None:
                with lock:
                    log.write(f"{method} {status.split()[0]} {environ.get('PATH_INFO', '')}\n")
            return start_response(status, headers, exc_info)

        return body_of(environ, respond)

    server = make_server("127.0.0.1", 0, counted, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_port, flush=True)
    sys.stdin.readline()
    server.shutdown()


@dataclass
class LoopbackS3:
    endpoint: str
    process: subprocess.Popen
    log: Path | None = None  # one line per request the server answered: METHOD STATUS PATH
    keys: dict[str, tuple[str, str]] = field(default_factory=lambda: {"default": KEY})

    def aws_env(self, identity: Identity = "default") -> dict[str, str]:
        """The AWS variables that make botocore (and so s3fs) talk to this server as `identity`."""
        key, secret = self.keys[identity] if isinstance(identity, str) else identity
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,  # no profile of the machine's user leaks in
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def env(self, identity: Identity = "default", base: dict | None = None) -> dict[str, str]:
        """A whole environment (this one's, or `base`) for a child process that talks to this server."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if k not in AWS_VARS}
        return {**env, **self.aws_env(identity)}

    @contextmanager
    def active(self, identity: Identity = "default") -> Iterator[None]:
        """This process talks to the server as `identity` inside the block (s3fs's cached filesystems,
        which hold the endpoint and credentials they were made with, are dropped on the way in and out)."""
        import s3fs

        wanted = self.aws_env(identity)
        saved = {k: os.environ.get(k) for k in (*AWS_VARS, *wanted)}
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            for k in AWS_VARS:
                os.environ.pop(k, None)
            os.environ.update(wanted)
            yield
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def client(self, service: str = "s3", identity: Identity = "default"):
        """A boto3 client of the server (`identity` as in `aws_env`; moto's admin key when unknown)."""
        import boto3

        key, secret = (self.keys.get(identity, KEY) if isinstance(identity, str) else identity)
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=key, aws_secret_access_key=secret)  # fmt: skip

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stats(self) -> dict:
        """What the server has answered so far: requests (all, by method), bytes in and out."""
        with urllib.request.urlopen(self.endpoint + STATS_PATH, timeout=30) as r:
            return json.loads(r.read())

    def require_auth(self) -> None:
        """moto's switch: authenticate and authorize every request from now on (users made before
        through the IAM API; the `default` key no longer works)."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            if r.status != 200:
                raise LensCacheError(f"the loopback S3 server refused to turn on authentication ({r.status})")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # the child stops its server on EOF
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def stats_delta(after: dict, before: dict) -> dict:
    """The requests and bytes between two `LoopbackS3.stats` readings."""
    methods = {m: n - before["by_method"].get(m, 0) for m, n in after["by_method"].items()}
    return {
        "requests": after["requests"] - before["requests"],
        "by_method": {m: n for m, n in methods.items() if n},
        "bytes_in": after["bytes_in"] - before["bytes_in"],
        "bytes_out": after["bytes_out"] - before["bytes_out"],
    }


@contextmanager
def loopback_s3(*buckets: str, log: Path | None = None, cls: type[LoopbackS3] = LoopbackS3) -> Iterator[LoopbackS3]:
    """A started server (a `cls`) with `buckets` made, logging its requests to `log`; stopped at the end."""
    try:
        import moto.server  # noqa: F401
        import werkzeug  # noqa: F401
    except ImportError:
        raise LensCacheError("the loopback S3 server needs moto's server: pip install 'moto[server]'") from None
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS}
    code = f"from lenscache.tools.s3_loopback import serve; serve({str(log) if log else None!r})"
    if log is not None:
        Path(log).touch()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    server = None
    try:
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise LensCacheError(f"the loopback S3 server did not start (it printed {line!r})")
        server = cls(f"http://127.0.0.1:{int(line)}", proc, Path(log) if log else None)
        for bucket in buckets:
            server.make_bucket(bucket)
        yield server
    finally:
        if server is not None:
            server.stop()
        elif proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    with loopback_s3() as server:
        print(f"S3 API on {server.endpoint} (objects in memory, any key); for lenscache in another shell:")
        for k, v in server.aws_env().items():
            print(f"export {k}={v}")
        print("stop with Ctrl-D", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
