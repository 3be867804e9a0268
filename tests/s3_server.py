"""A real S3 API server on loopback for the tests (not a test module): `lenscache.tools.s3_loopback`'s
moto server in a child process, with IAM users and authentication on.

`s3_server` starts the server, creates IAM users through its own IAM API and then turns on moto's
request authentication, after which every request must be signed by one of those users and is
checked against that user's policy:

- ``writer``: every S3 action (also the `default` identity of `env`, `as_identity` and `client`);
- ``reader``: ``s3:GetObject`` and ``s3:ListBucket`` only (a read-only identity: any write is
  refused by the server with AccessDenied).

The server logs one line per request it answers, which `S3Server.requests` reads back (what the tests
count writes by). Nothing leaves loopback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lenscache.tools.s3_loopback import LoopbackS3, loopback_s3

READ_ONLY_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}],
}
FULL_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
WRITE_METHODS = ("PUT", "POST", "DELETE", "PATCH")


class S3Server(LoopbackS3):
    """The loopback server with the tests' users; `as_identity` is `active`."""

    as_identity = LoopbackS3.active

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

    def objects(self, bucket: str) -> dict[str, str]:
        """Every object in `bucket` with its ETag (what changed in a bucket shows here)."""
        s3, out = self.client(), {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
        return out

    def add_user(self, name: str, policy: dict) -> None:
        iam = self.client("iam", identity="admin")  # before authentication is on, any key is the admin
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        self.keys[name] = (key["AccessKeyId"], key["SecretAccessKey"])


@contextmanager
def s3_server(workdir: Path) -> Iterator[S3Server]:
    """A started server with users ``writer`` and ``reader`` and authentication on; stopped at the end.
    Its request log goes to `workdir`."""
    with loopback_s3(log=Path(workdir) / "s3-requests.log", cls=S3Server) as server:
        server.add_user("writer", FULL_POLICY)
        server.add_user("reader", READ_ONLY_POLICY)
        server.require_auth()
        server.keys["default"] = server.keys["writer"]
        yield server


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
