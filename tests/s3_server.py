"""A real S3 API server on loopback for the tests (not a test module): moto's server in a child process.

`S3Server` starts ``moto.server.ThreadedMotoServer`` in a subprocess on 127.0.0.1 (the port is the
one the OS picked, printed back by the child, so there is no race for a port), creates IAM users
through the server's own IAM API and then turns on moto's request authentication, after which every
request must be signed by one of those users and is checked against that user's policy:

- ``writer``: every S3 action;
- ``reader``: ``s3:GetObject`` and ``s3:ListBucket`` only (a read-only identity: any write is
  refused by the server with AccessDenied).

lenscache reaches the server the way a user's program reaches any S3-compatible service: through the
standard AWS environment variables (`env`), which botocore (and so s3fs) reads: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``. Nothing leaves loopback.
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

REGION = "us-east-1"
ADMIN_KEY = ("testing", "testing")  # used before authentication is on (moto accepts anything then)

_CHILD = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
from urllib.parse import quote, unquote
import moto.iam.access_control as access

# moto's server receives the query string re-quoted by werkzeug ('/' in a value arrives bare) and
# checks the signature against that, so every signed request with a '/' in a query value (a
# listing by prefix) fails with SignatureDoesNotMatch (getmoto/moto#5948). Put the query back in
# the canonical form the client signed (RFC 3986, as botocore quotes it) before moto checks it.
_init = access.IAMRequestBase.__init__
def _canonical(path):
    base, sep, query = path.partition("?")
    pairs = (p.partition("=") for p in query.split("&")) if sep else ()
    fixed = "&".join(quote(unquote(k), safe="-_.~") + e + quote(unquote(v), safe="-_.~") for k, e, v in pairs)
    return base + sep + fixed
def _patched(self, *args, path, **kwargs):
    _init(self, *args, path=_canonical(path), **kwargs)
access.IAMRequestBase.__init__ = _patched

import threading
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

app = DomainDispatcherApplication(create_backend_app)
log, log_lock = open(sys.argv[1], "a", buffering=1), threading.Lock()
def logged(environ, start_response):
    # one line per request: method, status, path (what the tests count writes by)
    def respond(status, headers, exc_info=None):
        with log_lock:
            log.write(f"{environ['REQUEST_METHOD']} {status.split()[0]} {environ.get('PATH_INFO', '')}\\n")
        return start_response(status, headers, exc_info)
    return app(environ, respond)
server = make_server("127.0.0.1", 0, logged, threaded=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.server_port, flush=True)
sys.stdin.readline()
server.shutdown()
"""

READ_ONLY_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}],
}
FULL_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
# every environment variable that could carry another identity or endpoint into a child process
AWS_VARS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3")  # fmt: skip


WRITE_METHODS = ("PUT", "POST", "DELETE", "PATCH")


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    log: Path  # one line per request the server answered: METHOD STATUS PATH
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)

    def requests(self) -> list[tuple[str, int, str]]:
        """Every request the server has answered so far, in order: (method, status, path)."""
        out = []
        for line in self.log.read_text().splitlines():
            method, status, path = line.split(" ", 2)
            out.append((method, int(status), path))
        return out

    def writes_since(self, mark: int) -> list[tuple[str, int, str]]:
        """The write requests (PUT/POST/DELETE, answered or refused) after the first `mark` requests."""
        return [r for r in self.requests()[mark:] if r[0] in WRITE_METHODS]

    def aws_env(self, identity: str | tuple[str, str] = "writer") -> dict[str, str]:
        """The AWS variables that make botocore (and so s3fs) talk to this server as `identity`
        (writer, reader, or a (key, secret) pair)."""
        key, secret = self.keys[identity] if isinstance(identity, str) else identity
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,  # no profile of the machine's user leaks in
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def env(self, identity: str | tuple[str, str] = "writer", base: dict | None = None) -> dict[str, str]:
        """A whole environment for a child process that talks to this server as `identity`."""
        env = {k: v for k, v in (base or os.environ).items() if k not in AWS_VARS}
        return {**env, **self.aws_env(identity)}

    @contextmanager
    def as_identity(self, identity: str | tuple[str, str] = "writer") -> Iterator[None]:
        """This process talks to the server as `identity` inside the block (s3fs's cached filesystems,
        which hold their credentials, are dropped on the way in and out)."""
        import s3fs

        saved = {k: os.environ.get(k) for k in (*AWS_VARS, *self.aws_env(identity))}
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            for k in AWS_VARS:
                os.environ.pop(k, None)
            os.environ.update(self.aws_env(identity))
            yield
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def client(self, service: str = "s3", identity: str = "writer"):
        import boto3

        key, secret = self.keys[identity] if identity in self.keys else ADMIN_KEY
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=key, aws_secret_access_key=secret)  # fmt: skip

    def objects(self, bucket: str) -> dict[str, str]:
        """Every object in `bucket` with its ETag (what changed in a bucket shows here)."""
        s3, out = self.client(), {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
        return out

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def _add_user(self, name: str, policy: dict) -> None:
        iam = self.client("iam", identity="admin")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        self.keys[name] = (key["AccessKeyId"], key["SecretAccessKey"])

    def _require_auth(self) -> None:
        # moto's switch: authenticate and authorize every request from now on
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # the child stops its server on EOF
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def s3_server(workdir: Path) -> Iterator[S3Server]:
    """A started server with users ``writer`` and ``reader`` and authentication on; stopped at the end.
    Its request log goes to `workdir`."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS}
    log = Path(workdir) / "s3-requests.log"
    log.touch()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(log)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    server = None
    try:
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"the moto server did not start (it printed {line!r})")
        server = S3Server(f"http://127.0.0.1:{int(line)}", proc, log)
        server._add_user("writer", FULL_POLICY)
        server._add_user("reader", READ_ONLY_POLICY)
        server._require_auth()
        yield server
    finally:
        if server is not None:
            server.stop()
        elif proc.poll() is None:
            proc.kill()
            proc.wait()


# Several CLI invocations in one process (one interpreter start instead of one per command);
# each one's exit code and output are framed by marker lines.
RUN_MANY = """
import json, sys
from lenscache.tools.cli import main
for i, argv in enumerate(json.loads(sys.argv[1])):
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    sys.stdout.flush(); sys.stderr.flush()
    print(f"@@ {i} {code}", flush=True); print(f"@@ {i} {code}", file=sys.stderr, flush=True)
"""


def run_many(env: dict, *commands: list[str]) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each `lenscache` command, run one after the other in one child process
    with environment `env` (as `env()` makes it: one identity per child)."""
    r = subprocess.run([sys.executable, "-c", RUN_MANY, json.dumps([list(c) for c in commands])], env=env,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr

    def split(text: str) -> list[tuple[int, str]]:
        parts, current = [], []
        for line in text.splitlines():
            if line.startswith("@@ "):
                parts.append((int(line.split()[2]), "\n".join(current)))
                current = []
            else:
                current.append(line)
        return parts

    out, err = split(r.stdout), split(r.stderr)
    assert len(out) == len(commands), r.stderr
    return [(code, o, e) for (code, o), (_, e) in zip(out, err, strict=True)]
