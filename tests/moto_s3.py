"""A real S3-protocol server for tests: moto's server mode on 127.0.0.1, a free port, one bucket.

Not a mock of our code or of pyarrow: pyarrow's C++ S3 client talks HTTP to it exactly as it would to AWS
or MinIO. The environment it hands back is what a user exports for any S3-compatible endpoint.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(bucket: str = "raylstm-test") -> Iterator[dict[str, str]]:
    """Start moto's S3 server, create `bucket`, yield the env vars that point clients at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        # Any non-empty keys: moto checks the signature format, not the secret. Without them the AWS SDK
        # would walk its credential chain up to the EC2 metadata service and time out.
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        # Keep the SDK off the EC2 metadata endpoint entirely.
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()


@contextmanager
def exported_s3_server(bucket: str = "raylstm-test") -> Iterator[dict[str, str]]:
    """`s3_server`, with its env also exported into this process (and restored afterwards)."""
    with s3_server(bucket) as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
