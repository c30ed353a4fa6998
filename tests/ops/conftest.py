"""Real services for the ops tests: a moto server and a redis-server, both on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from ecg_audio.settings import Settings
from tests.ops.helpers import REGION, aws_settings, free_port, reset_moto


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server for the session; ``aws`` resets its state before each test."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in _FAKE_AWS_ENV}
    os.environ.update(_FAKE_AWS_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    # Never reach a real instance metadata service from a test.
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture
def aws(moto_endpoint: str) -> str:
    reset_moto(moto_endpoint)
    return moto_endpoint


@pytest.fixture
def settings(aws: str) -> Settings:
    return aws_settings(aws)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        pytest.fail("redis-server is required for tests/ops (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[object]:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def worker_group(settings: Settings) -> Callable[[int], list[str]]:
    """Makes the moto group ``settings.worker_asg_name`` with n instances; returns their ids."""
    return lambda desired: _create_worker_group(settings, desired)


def _create_worker_group(settings: Settings, desired: int) -> list[str]:
    from ops import aws

    ec2 = aws.client("ec2", settings)
    image_id = "ami-12c6146b"  # any id: moto does not check it, and listing images is slow
    ec2.create_launch_template(
        LaunchTemplateName="ecg-worker-test",
        LaunchTemplateData={"ImageId": image_id, "InstanceType": "g4dn.xlarge"},
    )
    aws.client("autoscaling", settings).create_auto_scaling_group(
        AutoScalingGroupName=settings.worker_asg_name,
        LaunchTemplate={"LaunchTemplateName": "ecg-worker-test", "Version": "$Latest"},
        MinSize=0,
        MaxSize=5,
        DesiredCapacity=desired,
        AvailabilityZones=[f"{REGION}a"],
    )
    groups = aws.client("autoscaling", settings).describe_auto_scaling_groups(
        AutoScalingGroupNames=[settings.worker_asg_name]
    )["AutoScalingGroups"]
    return [i["InstanceId"] for i in groups[0]["Instances"]]
