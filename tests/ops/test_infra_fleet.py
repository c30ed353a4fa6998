"""infra/fleet.yaml (the whole fleet) and the staged worker deploy: cfn-lint, a moto stack, the rest.

moto 5.2's CloudFormation creates the VPC-side resources, the ECS cluster, task definitions
and services, the load balancer with its listeners, rule and target groups, the IAM roles
and policies, the log group and the nested worker stack; it has no AWS::SecretsManager::Secret,
no AWS::ElastiCache::* and no AWS::CloudWatch::Alarm (and crashes on an output that reads an
attribute of one). Those resources are made through the API calls they map to, from the
template's own properties, and their references in the template replaced by what the calls
returned before moto's CloudFormation sees it. moto runs no Lambda without Docker: the
staged deploy's function is run here, in-process, against moto's Auto Scaling group, with
the three instance-refresh calls moto lacks validated against the service's request model.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from ecg_audio.settings import Settings
from ops import aws
from tests.conftest import free_port
from tests.helpers import aws_settings, reset_moto

pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse:UserWarning")

INFRA = Path(__file__).resolve().parents[2] / "infra"
FLEET = INFRA / "fleet.yaml"
WORKERS = INFRA / "worker-asg.yaml"
STACK = "fleet"
TAG = "3f2c1ab"
# made through the API, not moto's CloudFormation (see the module docstring)
BY_API = {"AWS::SecretsManager::Secret", "AWS::ElastiCache::SubnetGroup", "AWS::ElastiCache::ParameterGroup",
          "AWS::ElastiCache::ReplicationGroup", "AWS::CloudWatch::Alarm"}  # fmt: skip


def _load(path: Path) -> dict[str, Any]:
    from cfnlint.decode import decode_str

    template, problems = decode_str(path.read_text())
    assert not problems
    return json.loads(json.dumps(template))


def _substitute(node: Any, values: dict[str, Any]) -> Any:
    """Replace Ref, GetAtt and ${...} in Sub that name a key of ``values`` (``R`` or ``R.Attr``)."""
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    if not isinstance(node, dict):
        return node
    if set(node) == {"Ref"} and node["Ref"] in values:
        return values[node["Ref"]]
    if set(node) == {"Fn::GetAtt"}:
        name = ".".join(node["Fn::GetAtt"]) if isinstance(node["Fn::GetAtt"], list) else node["Fn::GetAtt"]
        if name in values:
            return values[name]
    if set(node) == {"Fn::Join"}:
        separator, parts = node["Fn::Join"]
        resolved = _substitute(parts, values)
        if isinstance(resolved, list) and all(isinstance(p, str) for p in resolved):
            return separator.join(resolved)
    if set(node) == {"Fn::Sub"} and isinstance(node["Fn::Sub"], str):
        text = re.sub(r"\$\{([\w.:]+)\}", lambda m: str(values.get(m.group(1), m.group(0))), node["Fn::Sub"])
        return text if "${" not in text else {"Fn::Sub": text}
    return {k: _substitute(v, values) for k, v in node.items()}


def test_cfn_lint_passes_on_every_template() -> None:
    templates = sorted(str(p) for p in INFRA.glob("*.yaml"))
    assert {Path(t).name for t in templates} >= {"fleet.yaml", "worker-asg.yaml"}
    command = [shutil.which("cfn-lint")] if shutil.which("cfn-lint") else [sys.executable, "-m", "cfnlint"]
    result = subprocess.run([*command, *templates], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "", result.stdout  # no warnings either


# --- the whole fleet in moto -------------------------------------------------------------------


def _generated(settings: Settings, properties: dict[str, Any]) -> str:
    spec = properties["GenerateSecretString"]
    password = aws.client("secretsmanager", settings).get_random_password(
        PasswordLength=spec["PasswordLength"], ExcludePunctuation=spec["ExcludePunctuation"]
    )["RandomPassword"]
    return json.dumps({**json.loads(spec["SecretStringTemplate"]), spec["GenerateStringKey"]: password})


def _secret_value(settings: Settings, arn: str) -> dict[str, Any]:
    value = aws.client("secretsmanager", settings).get_secret_value(SecretId=arn)["SecretString"]
    return dict(json.loads(value))


def _make_by_api(settings: Settings, template: dict[str, Any], subnets: list[str]) -> dict[str, Any]:
    """Secrets and Redis as the template describes them; returns what their references resolve to."""
    resources = template["Resources"]
    secrets = aws.client("secretsmanager", settings)
    values: dict[str, Any] = {n: p["Default"] for n, p in template["Parameters"].items() if "Default" in p}
    values.update({"PrivateSubnets": subnets, "AWS::StackName": STACK})
    for name in ("AppSecret", "RedisAuthSecret", "FlowerSecret"):
        properties = resources[name]["Properties"]
        values[name] = secrets.create_secret(
            Name=f"{STACK}-{name}", Description=properties["Description"], SecretString=_generated(settings, properties)
        )["ARN"]
    token = _secret_value(settings, values["RedisAuthSecret"])["token"]

    elasticache = aws.client("elasticache", settings)
    group = resources["RedisSubnetGroup"]["Properties"]
    elasticache.create_cache_subnet_group(
        CacheSubnetGroupName=f"{STACK}-redis", CacheSubnetGroupDescription=group["Description"], SubnetIds=subnets
    )
    redis = _substitute(resources["Redis"]["Properties"], {**values, "RedisSubnetGroup": f"{STACK}-redis"})
    dynamic = f"{{{{resolve:secretsmanager:{values['RedisAuthSecret']}:SecretString:token}}}}"
    assert redis.pop("AuthToken") == dynamic  # CloudFormation resolves it; here the test does
    redis.pop("SecurityGroupIds")  # the stack makes the group after this; checked from the template
    redis.pop("CacheParameterGroupName")  # moto has no parameter groups; noeviction is checked in the template
    elasticache.create_replication_group(
        ReplicationGroupId=f"{STACK}-redis",
        AuthToken=token,
        **{**redis, "NumCacheClusters": int(redis["NumCacheClusters"])},
    )
    described = elasticache.describe_replication_groups(ReplicationGroupId=f"{STACK}-redis")["ReplicationGroups"][0]
    values["Redis"] = f"{STACK}-redis"
    primary = described["NodeGroups"][0]["PrimaryEndpoint"]
    values["Redis.PrimaryEndPoint.Address"] = primary["Address"]
    values["Redis.PrimaryEndPoint.Port"] = primary["Port"]

    url_secret = _substitute(resources["RedisUrlSecret"]["Properties"]["SecretString"], values)
    values["RedisUrlSecret"] = secrets.create_secret(
        Name=f"{STACK}-RedisUrlSecret", SecretString=url_secret.replace(dynamic, token)
    )["ARN"]
    return values


@pytest.fixture(scope="module")
def fleet(moto_endpoint: str) -> dict[str, Any]:
    reset_moto(moto_endpoint)
    return _build_fleet(aws_settings(moto_endpoint))


def _build_fleet(settings: Settings) -> dict[str, Any]:
    ec2 = aws.client("ec2", settings)
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnets = sorted(
        (s["AvailabilityZone"], s["SubnetId"])
        for s in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    )
    public, private = [s for _, s in subnets[:2]], [s for _, s in subnets[2:4]]
    parameters = {
        "VpcId": vpc,
        "PublicSubnets": ",".join(public),
        "PrivateSubnets": ",".join(private),
        "CertificateArn": aws.client("acm", settings).request_certificate(DomainName="api.example.com")[
            "CertificateArn"
        ],
        "ImageTag": TAG,
        "WorkerImageId": "ami-12c6146b",
        # moto runs a custom resource's Lambda in Docker, which is not here: the staged
        # deploy's function is run by the tests below instead
        "DeployStrategy": "rolling",
    }
    template = _load(FLEET)
    values = {
        **_make_by_api(settings, template, private),
        **parameters,
        "PrivateSubnets": private,
        "PublicSubnets": public,
    }
    cloudformation = aws.client("cloudformation", settings)

    # The nested worker stack: moto's nested stacks have no Outputs attribute, so it is made
    # with CreateStack (what CloudFormation does for it), before the fleet that reads its
    # outputs, with the worker security group it needs made first, from the template.
    group = template["Resources"]["WorkerSecurityGroup"]["Properties"]
    values["WorkerSecurityGroup"] = ec2.create_security_group(
        GroupName=f"{STACK}-workers", Description=group["GroupDescription"], VpcId=vpc
    )["GroupId"]
    worker_parameters = _substitute(template["Resources"]["Workers"]["Properties"]["Parameters"], values)
    worker_parameters["Subnets"] = ",".join(private)
    cloudformation.create_stack(
        StackName=f"{STACK}-Workers",
        TemplateBody=WORKERS.read_text(),
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": k, "ParameterValue": str(v)} for k, v in worker_parameters.items()],
    )
    workers = cloudformation.describe_stacks(StackName=f"{STACK}-Workers")["Stacks"][0]
    assert workers["StackStatus"] == "CREATE_COMPLETE", workers.get("StackStatusReason")
    for output in workers["Outputs"]:
        values[f"Workers.Outputs.{output['OutputKey']}"] = output["OutputValue"]
    # moto has no alarms, so no output that names one: the name CloudFormation gives it
    values.setdefault("Workers.Outputs.DeployFailureAlarmName", f"{STACK}-Workers-DeployFailureAlarm")
    worker_resources = cloudformation.list_stack_resources(StackName=f"{STACK}-Workers")["StackResourceSummaries"]

    skipped = BY_API | {"AWS::CloudFormation::Stack"}
    moto_template = {
        **template,
        "Resources": {
            n: _substitute(r, values)
            for n, r in template["Resources"].items()
            if r["Type"] not in skipped and n != "WorkerSecurityGroup"
        },
        "Outputs": {n: _substitute(o, values) for n, o in template["Outputs"].items()},
    }
    # ECS keeps the alarm's name only
    moto_template["Resources"]["ShimService"]["Properties"]["DeploymentConfiguration"]["Alarms"]["AlarmNames"] = [
        "ShimErrorsAlarm"
    ]
    cloudformation.create_stack(
        StackName=STACK,
        TemplateBody=json.dumps(moto_template),
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
    )
    described = cloudformation.describe_stacks(StackName=STACK)["Stacks"][0]
    assert described["StackStatus"] == "CREATE_COMPLETE", described.get("StackStatusReason")
    resources = cloudformation.list_stack_resources(StackName=STACK)["StackResourceSummaries"]
    created = {r["LogicalResourceId"]: (r["ResourceType"], r["PhysicalResourceId"]) for r in resources}
    created["WorkerSecurityGroup"] = ("AWS::EC2::SecurityGroup", values["WorkerSecurityGroup"])
    outputs = {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}
    return {
        "settings": settings,
        "template": template,
        "values": values,
        "created": created,
        "workers": {r["LogicalResourceId"]: r["ResourceType"] for r in worker_resources if r["LogicalResourceId"]},
        "outputs": outputs,
        "private": private,
    }


def test_moto_creates_the_fleet(fleet: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    created, template = fleet["created"], fleet["template"]
    with capsys.disabled():  # the list the report quotes
        print("\nmoto created (fleet):", ", ".join(f"{n} ({t})" for n, (t, _) in sorted(created.items())))
        print("moto created (workers):", ", ".join(f"{n} ({t})" for n, t in sorted(fleet["workers"].items())))
        by_api = sorted(n for n, r in template["Resources"].items() if r["Type"] in BY_API and n != "RedisParameters")
        print("made by API:", ", ".join(by_api), "| from the template only: RedisParameters (moto has none)")
    expected = {n for n, r in template["Resources"].items() if r["Type"] not in BY_API and n != "Workers"}
    assert set(created) == expected
    assert {"WorkerGroup", "WorkerLaunchTemplate", "MediaBucket", "WorkerRole"} <= set(fleet["workers"])
    # the nested worker stack made its group and bucket, and the shim is told their names
    assert fleet["outputs"]["WorkerGroupName"].endswith("-workers")
    assert fleet["outputs"]["MediaBucketName"]


def test_shim_runs_two_tasks_behind_https_with_a_rollback(fleet: dict[str, Any]) -> None:
    settings, created = fleet["settings"], fleet["created"]
    ecs = aws.client("ecs", settings)
    cluster = created["Cluster"][1]
    (service,) = ecs.describe_services(cluster=cluster, services=[created["ShimService"][1]])["services"]
    assert service["desiredCount"] >= 2
    assert service["taskDefinition"] == created["ShimTaskDefinition"][1]
    # moto's CloudFormation keeps little more of a service: read the rest from the template
    properties = fleet["template"]["Resources"]["ShimService"]["Properties"]
    network = properties["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert network["Subnets"] == {"Ref": "PrivateSubnets"} and network["AssignPublicIp"] == "DISABLED"
    assert properties["LoadBalancers"] == [
        {"ContainerName": "shim", "ContainerPort": 8000, "TargetGroupArn": {"Ref": "ShimTargetGroup"}}
    ]
    assert properties["LaunchType"] == "FARGATE"
    assert fleet["template"]["Parameters"]["ShimTaskCount"]["MinValue"] >= 2
    deployment = properties["DeploymentConfiguration"]
    assert deployment["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
    assert deployment["MinimumHealthyPercent"] == 100
    # the private subnets lie in different AZs: ECS spreads Fargate tasks over them
    subnets = aws.client("ec2", settings).describe_subnets(SubnetIds=fleet["private"])["Subnets"]
    assert len({s["AvailabilityZone"] for s in subnets}) >= 2

    elb = aws.client("elbv2", settings)
    (group,) = elb.describe_target_groups(TargetGroupArns=[created["ShimTargetGroup"][1]])["TargetGroups"]
    assert (group["HealthCheckPath"], group["TargetType"], group["Port"]) == ("/health/ready", "ip", 8000)
    listeners = {
        listener["Port"]: listener
        for listener in elb.describe_listeners(LoadBalancerArn=created["LoadBalancer"][1])["Listeners"]
    }
    assert listeners[443]["Protocol"] == "HTTPS"
    assert listeners[443]["Certificates"][0]["CertificateArn"].startswith("arn:aws:acm:")
    assert listeners[80]["DefaultActions"][0]["Type"] == "redirect"
    # the route the shim's readiness really answers on
    from api_shim.routes.health import router

    assert "/health/ready" in {getattr(r, "path", None) for r in router.routes}


def test_flower_is_behind_the_load_balancer_with_a_password(fleet: dict[str, Any]) -> None:
    settings, created = fleet["settings"], fleet["created"]
    elb = aws.client("elbv2", settings)
    rules = elb.describe_rules(ListenerArn=created["HttpsListener"][1])["Rules"]
    flower = next(r for r in rules if r["Priority"] == "10")
    assert flower["Conditions"][0]["PathPatternConfig"]["Values"] == ["/flower", "/flower/*"]
    assert flower["Actions"][0]["TargetGroupArn"] == created["FlowerTargetGroup"][1]
    ecs = aws.client("ecs", settings)
    (container,) = ecs.describe_task_definition(taskDefinition=created["FlowerTaskDefinition"][1])["taskDefinition"][
        "containerDefinitions"
    ]
    command = " ".join(container["command"])
    assert "--basic-auth=" in command and "--url_prefix=flower" in command
    secrets = {s["name"]: s["valueFrom"] for s in container["secrets"]}
    flower_secret = fleet["values"]["FlowerSecret"]
    assert secrets == {"FLOWER_USER": f"{flower_secret}:username::", "FLOWER_PASSWORD": f"{flower_secret}:password::"}
    password = _secret_value(settings, flower_secret)["password"]
    assert len(password) == 32 and password not in json.dumps(container)


def test_the_publisher_runs_exactly_once(fleet: dict[str, Any]) -> None:
    settings, created = fleet["settings"], fleet["created"]
    ecs = aws.client("ecs", settings)
    (service,) = ecs.describe_services(cluster=created["Cluster"][1], services=[created["PublisherService"][1]])[
        "services"
    ]
    # one task, and a deploy stops it before starting its successor: never two publishers
    # (moto's CloudFormation drops DeploymentConfiguration: read it from the template)
    assert service["desiredCount"] == 1
    deployment = fleet["template"]["Resources"]["PublisherService"]["Properties"]["DeploymentConfiguration"]
    assert deployment["MaximumPercent"] == 100
    (container,) = ecs.describe_task_definition(taskDefinition=created["PublisherTaskDefinition"][1])["taskDefinition"][
        "containerDefinitions"
    ]
    assert container["command"] == ["ecg-audio", "metrics"]
    environment = {e["name"]: e["value"] for e in container["environment"]}
    assert environment["ECG_WORKER_ASG_NAME"] == fleet["outputs"]["WorkerGroupName"]
    # no worker-side service or schedule runs a second one
    template = fleet["template"]
    publishers = [n for n, r in template["Resources"].items() if "metrics" in json.dumps(r.get("Properties", {}))]
    assert [n for n in publishers if template["Resources"][n]["Type"] == "AWS::ECS::Service"] == []
    assert [n for n in publishers if template["Resources"][n]["Type"] == "AWS::ECS::TaskDefinition"] == [
        "PublisherTaskDefinition"
    ]


def test_every_process_reads_the_secrets_and_none_is_inline(fleet: dict[str, Any]) -> None:
    settings, created, values = fleet["settings"], fleet["created"], fleet["values"]
    ecs = aws.client("ecs", settings)
    app = _secret_value(settings, values["AppSecret"])
    assert app["ECG_API_KEYS"] == []  # set by the operator; until then the shim refuses every request
    assert len(app["ECG_CALLBACK_SIGNING_KEY"]) == 48
    for name in ("ShimTaskDefinition", "FlowerTaskDefinition", "PublisherTaskDefinition"):
        definition = ecs.describe_task_definition(taskDefinition=created[name][1])["taskDefinition"]
        (container,) = definition["containerDefinitions"]
        environment = {e["name"]: e["value"] for e in container["environment"]}
        ids = environment["ECG_SECRETS_MANAGER_SECRET_ID"].split(",")
        assert ids == [values["AppSecret"], values["RedisUrlSecret"]], name
        assert container["image"].endswith(f":{TAG}")
        dumped = json.dumps(definition)
        assert app["ECG_CALLBACK_SIGNING_KEY"] not in dumped and "rediss://" not in dumped


def test_redis_is_multi_az_tls_with_a_token_and_never_evicts(fleet: dict[str, Any]) -> None:
    settings, values, template = fleet["settings"], fleet["values"], fleet["template"]
    (group,) = aws.client("elasticache", settings).describe_replication_groups(ReplicationGroupId=values["Redis"])[
        "ReplicationGroups"
    ]
    assert group["AutomaticFailover"] == "enabled" and group["MultiAZ"] == "enabled"
    assert group["TransitEncryptionEnabled"] and group["AtRestEncryptionEnabled"] and group["AuthTokenEnabled"]
    # a primary and at least one replica (moto makes one member whatever NumCacheClusters says)
    assert resources_of(template)["Redis"]["Properties"]["NumCacheClusters"] == {"Ref": "RedisNodes"}
    assert template["Parameters"]["RedisNodes"]["MinValue"] == 2
    assert group["SnapshotRetentionLimit"] >= 1
    resources = template["Resources"]
    assert resources["RedisParameters"]["Properties"]["Properties"] == {"maxmemory-policy": "noeviction"}
    assert resources["Redis"]["Properties"]["SecurityGroupIds"] == [{"Ref": "RedisSecurityGroup"}]
    # only the fleet's own processes reach it
    (redis_sg,) = aws.client("ec2", settings).describe_security_groups(
        GroupIds=[fleet["created"]["RedisSecurityGroup"][1]]
    )["SecurityGroups"]
    sources = {p["GroupId"] for rule in redis_sg["IpPermissions"] for p in rule["UserIdGroupPairs"]}
    expected = {"ShimSecurityGroup", "FlowerSecurityGroup", "PublisherSecurityGroup", "WorkerSecurityGroup"}
    assert sources == {fleet["created"][n][1] for n in expected}
    assert all(rule["FromPort"] == 6379 for rule in redis_sg["IpPermissions"])
    # the URL every process loads: TLS, the token, the primary endpoint (which follows a failover)
    import redis

    url = _secret_value(settings, values["RedisUrlSecret"])["ECG_REDIS_URL"]
    pool = redis.ConnectionPool.from_url(url)
    token = _secret_value(settings, values["RedisAuthSecret"])["token"]
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs["password"] == token
    assert pool.connection_kwargs["host"] == values["Redis.PrimaryEndPoint.Address"]


def resources_of(template: dict[str, Any]) -> dict[str, Any]:
    return dict(template["Resources"])


def test_the_fleet_alarms_are_valid(fleet: dict[str, Any]) -> None:
    settings, created, template = fleet["settings"], fleet["created"], fleet["template"]
    elb = aws.client("elbv2", settings)
    lb_arn, tg_arn = created["LoadBalancer"][1], created["ShimTargetGroup"][1]
    values = {
        **fleet["values"],
        "LoadBalancer.LoadBalancerFullName": lb_arn.split(":loadbalancer/")[1],
        "ShimTargetGroup.TargetGroupFullName": tg_arn.split(":")[-1],
    }
    cloudwatch = aws.client("cloudwatch", settings)
    for name, resource in template["Resources"].items():
        if resource["Type"] == "AWS::CloudWatch::Alarm":
            properties = _substitute(resource["Properties"], values)
            properties.pop("AlarmActions")  # no topic here
            cloudwatch.put_metric_alarm(AlarmName=name, **properties)
    alarms = {a["AlarmName"]: a for a in cloudwatch.describe_alarms()["MetricAlarms"]}
    assert alarms["RedisMemoryAlarm"]["Dimensions"] == [{"Name": "CacheClusterId", "Value": f"{STACK}-redis-001"}]
    assert elb.describe_load_balancers(Names=[values["LoadBalancer.LoadBalancerFullName"].split("/")[1]])
    shim = template["Resources"]["ShimService"]["Properties"]["DeploymentConfiguration"]
    assert shim["Alarms"] == {"AlarmNames": [{"Ref": "ShimErrorsAlarm"}], "Enable": True, "Rollback": True}


# --- the staged deploy --------------------------------------------------------------------------


def _staged_deploy_module() -> types.ModuleType:
    """The Lambda's code, straight from the template."""
    code = _load(WORKERS)["Resources"]["StagedDeployFunction"]["Properties"]["Code"]["ZipFile"]
    module = types.ModuleType("staged_deploy")
    exec(compile(code, "index.py", "exec"), module.__dict__)  # noqa: S102 (our own template's code)
    return module


class _RefreshApi:
    """moto's Auto Scaling, plus the instance-refresh calls moto lacks, checked against the service model."""

    def __init__(self, autoscaling: Any) -> None:
        self._autoscaling = autoscaling
        self._model = autoscaling.meta.service_model
        self.refreshes: list[dict[str, Any]] = []
        self.calls: list[str] = []

    def _validate(self, operation: str, params: dict[str, Any]) -> None:
        from botocore.validate import validate_parameters

        validate_parameters(params, self._model.operation_model(operation).input_shape)
        self.calls.append(operation)

    def describe_auto_scaling_groups(self, **params: Any) -> Any:
        self.calls.append("DescribeAutoScalingGroups")
        return self._autoscaling.describe_auto_scaling_groups(**params)

    def update_auto_scaling_group(self, **params: Any) -> Any:
        self.calls.append("UpdateAutoScalingGroup")
        return self._autoscaling.update_auto_scaling_group(**params)

    def describe_instance_refreshes(self, **params: Any) -> dict[str, Any]:
        self._validate("DescribeInstanceRefreshes", params)
        return {"InstanceRefreshes": self.refreshes[-1:]}

    def cancel_instance_refresh(self, **params: Any) -> dict[str, Any]:
        self._validate("CancelInstanceRefresh", params)
        self.refreshes[-1]["Status"] = "Cancelled"
        return {"InstanceRefreshId": self.refreshes[-1]["InstanceRefreshId"]}

    def start_instance_refresh(self, **params: Any) -> dict[str, Any]:
        self._validate("StartInstanceRefresh", params)
        refresh_id = f"refresh-{len(self.refreshes) + 1}"
        self.refreshes.append({"InstanceRefreshId": refresh_id, "Status": "InProgress", "Request": params})
        return {"InstanceRefreshId": refresh_id}


class _CfnResponses(BaseHTTPRequestHandler):
    """Where a custom resource answers CloudFormation (a presigned S3 PUT in AWS)."""

    answers: list[dict[str, Any]] = []

    def do_PUT(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).answers.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def response_url() -> Iterator[str]:
    _CfnResponses.answers = []
    server = HTTPServer(("127.0.0.1", free_port()), _CfnResponses)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/response"
    server.shutdown()


def _worker_stack(settings: Settings, name: str) -> dict[str, str]:
    ec2 = aws.client("ec2", settings)
    subnets = [s["SubnetId"] for s in ec2.describe_subnets()["Subnets"]][:2]
    secret = aws.client("secretsmanager", settings).create_secret(Name=f"{name}/app", SecretString="{}")["ARN"]
    template = _load(WORKERS)
    parameters = {
        "ImageId": "ami-12c6146b",
        "Subnets": ",".join(subnets),
        "SecurityGroupIds": ec2.describe_security_groups()["SecurityGroups"][0]["GroupId"],
        "SecretArn": secret,
        "ImageTag": "v1",
    }
    cloudformation = aws.client("cloudformation", settings)
    cloudformation.create_stack(
        StackName=name,
        TemplateBody=json.dumps(template),
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
    )
    resources = cloudformation.list_stack_resources(StackName=name)["StackResourceSummaries"]
    return {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in resources}


def _preferences() -> dict[str, Any]:
    """The StagedDeploy resource's Preferences as CloudFormation renders them with the defaults."""
    template = _load(WORKERS)
    text = template["Resources"]["StagedDeploy"]["Properties"]["Preferences"]["Fn::Sub"]
    for name in ("DeployMinHealthyPercent", "DeployCheckpointWaitSeconds"):
        text = text.replace("${" + name + "}", str(template["Parameters"][name]["Default"]))
    return dict(json.loads(text.replace("${DeployFailureAlarm}", "staged-DeployFailureAlarm")))


def test_staged_deploy_refreshes_in_checkpoints_and_rolls_back_on_the_alarm(
    settings: Settings, response_url: str
) -> None:
    resources = _worker_stack(settings, "staged")
    group = resources["WorkerGroup"]
    ec2 = aws.client("ec2", settings)
    # a deploy: a new launch template version (a new ImageTag), which CloudFormation has
    # already set on the group when the custom resource runs
    template_id = resources["WorkerLaunchTemplate"]
    ec2.create_launch_template_version(
        LaunchTemplateId=template_id, SourceVersion="1", LaunchTemplateData={"InstanceType": "g5.xlarge"}
    )
    autoscaling = aws.client("autoscaling", settings)
    policy = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"][0][
        "MixedInstancesPolicy"
    ]
    policy["LaunchTemplate"]["LaunchTemplateSpecification"].pop("LaunchTemplateName")
    policy["LaunchTemplate"]["LaunchTemplateSpecification"]["Version"] = "2"
    autoscaling.update_auto_scaling_group(AutoScalingGroupName=group, MixedInstancesPolicy=policy)

    api = _RefreshApi(autoscaling)
    module = _staged_deploy_module()
    preferences = _preferences()
    event = {
        "RequestType": "Update",
        "ResponseURL": response_url,
        "StackId": "arn:aws:cloudformation:us-east-1:123456789012:stack/staged/1",
        "RequestId": "r-1",
        "LogicalResourceId": "StagedDeploy",
        "PhysicalResourceId": "staged-StagedDeploy",
        "ResourceProperties": {
            "GroupName": group,
            "LaunchTemplateVersion": "2",
            "Preferences": json.dumps(preferences),
        },
        "OldResourceProperties": {"GroupName": group, "LaunchTemplateVersion": "1", "Preferences": "{}"},
    }
    module.handler(event, None, asg=api)

    (answer,) = _CfnResponses.answers
    assert answer["Status"] == "SUCCESS", answer["Reason"]
    assert answer["Data"] == {"InstanceRefreshId": "refresh-1", "FromVersion": "1"}
    (refresh,) = api.refreshes
    request = refresh["Request"]
    assert request["Preferences"]["CheckpointPercentages"] == [10, 50, 100]
    assert request["Preferences"]["CheckpointDelay"] == 900  # the wait at each checkpoint
    assert request["Preferences"]["AutoRollback"] is True
    assert request["Preferences"]["AlarmSpecification"] == {"Alarms": ["staged-DeployFailureAlarm"]}
    desired = request["DesiredConfiguration"]["MixedInstancesPolicy"]["LaunchTemplate"]["LaunchTemplateSpecification"]
    assert desired["Version"] == "2"  # a numbered version: rollback needs one
    # the group's saved configuration is the rollback target: the version the workers run
    saved = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"][0]
    assert saved["MixedInstancesPolicy"]["LaunchTemplate"]["LaunchTemplateSpecification"]["Version"] == "1"
    assert api.calls.index("UpdateAutoScalingGroup") < api.calls.index("StartInstanceRefresh")

    # the next deploy while this one still runs supersedes it
    current = {"GroupName": group, "LaunchTemplateVersion": "2", "Preferences": json.dumps(preferences)}
    module.deploy(api, {**current, "LaunchTemplateVersion": "3"}, current, poll_s=0.01)
    assert api.refreshes[0]["Status"] == "Cancelled" and api.refreshes[1]["Status"] == "InProgress"
    assert "CancelInstanceRefresh" in api.calls


def test_staged_deploy_answers_failed_rather_than_never(settings: Settings, response_url: str) -> None:
    """A deploy it cannot start fails the stack update (which CloudFormation rolls back), at once."""
    module = _staged_deploy_module()
    api = _RefreshApi(aws.client("autoscaling", settings))
    event = {
        "RequestType": "Update",
        "ResponseURL": response_url,
        "StackId": "arn:aws:cloudformation:us-east-1:123456789012:stack/staged/1",
        "RequestId": "r-3",
        "LogicalResourceId": "StagedDeploy",
        "ResourceProperties": {"GroupName": "no-such-group", "LaunchTemplateVersion": "2", "Preferences": "{}"},
        "OldResourceProperties": {"GroupName": "no-such-group", "LaunchTemplateVersion": "1", "Preferences": "{}"},
    }
    module.handler(event, None, asg=api)
    (answer,) = _CfnResponses.answers
    assert answer["Status"] == "FAILED" and answer["Reason"].startswith("IndexError")

    _CfnResponses.answers.clear()
    module.handler({**event, "RequestType": "Create"}, None, asg=api)  # the group is new: nothing to refresh
    assert _CfnResponses.answers[0]["Status"] == "SUCCESS" and api.refreshes == []


def test_staged_is_a_template_parameter() -> None:
    template = _load(WORKERS)
    assert template["Parameters"]["DeployStrategy"]["AllowedValues"] == ["rolling", "staged"]
    assert template["Conditions"]["Staged"] == {"Fn::Equals": [{"Ref": "DeployStrategy"}, "staged"]}
    for name in ("StagedDeployRole", "StagedDeployFunction", "StagedDeploy"):
        assert template["Resources"][name]["Condition"] == "Staged"
    fleet = _load(FLEET)
    assert fleet["Resources"]["Workers"]["Properties"]["Parameters"]["DeployStrategy"] == {"Ref": "DeployStrategy"}
    assert fleet["Parameters"]["DeployStrategy"]["Default"] == "staged"
