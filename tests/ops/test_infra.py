"""infra/worker-asg.yaml: cfn-lint, a moto stack, and the parts moto's CloudFormation skips.

moto 5.2's CloudFormation creates the bucket (without its lifecycle rules), log
group, IAM role, instance profile, managed policy, launch template and Auto Scaling
group, but skips AWS::AutoScaling::ScalingPolicy, AWS::CloudWatch::Alarm and
AWS::S3::BucketPolicy. Those resources' properties are sent through the direct API
calls they map to, so moto still validates them, and they are checked against the
metrics the code really sends.
"""

from __future__ import annotations

import ast
import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ecg_audio.settings import Settings
from ops import aws
from ops.job_metrics import JobMetrics, MetricBatcher
from ops.queue_metrics import Backlog, publish
from tests.ops.helpers import aws_settings, reset_moto

# moto says which resource types its CloudFormation skips; the docstring above covers them.
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse:UserWarning")

TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "worker-asg.yaml"
STACK = "ecg"
GROUP = f"{STACK}-workers"


def _template() -> dict[str, Any]:
    from cfnlint.decode import decode_str

    template, problems = decode_str(TEMPLATE.read_text())
    assert not problems
    return json.loads(json.dumps(template))


def _resolve(value: Any, refs: dict[str, str]) -> Any:
    """Just the intrinsics the alarm and policy properties use."""
    if isinstance(value, dict):
        if set(value) == {"Ref"}:
            return refs[value["Ref"]]
        if set(value) == {"Fn::If"}:
            return None  # no alarm topic in the test
        return {k: r for k, v in value.items() if (r := _resolve(v, refs)) is not None}
    if isinstance(value, list):
        return [_resolve(v, refs) for v in value]
    return value


def test_cfn_lint_passes() -> None:
    command = [shutil.which("cfn-lint")] if shutil.which("cfn-lint") else [sys.executable, "-m", "cfnlint"]
    result = subprocess.run([*command, str(TEMPLATE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def infra_settings(moto_endpoint: str) -> Settings:
    """Settings for one moto stack shared by this module (creating it takes seconds)."""
    reset_moto(moto_endpoint)
    return aws_settings(moto_endpoint)


@pytest.fixture(scope="module")
def stack(infra_settings: Settings) -> dict[str, str]:
    settings = infra_settings
    ec2 = aws.client("ec2", settings)
    subnets = [s["SubnetId"] for s in ec2.describe_subnets()["Subnets"]][:2]
    security_group = ec2.describe_security_groups()["SecurityGroups"][0]["GroupId"]
    secret_arn = aws.client("secretsmanager", settings).create_secret(Name="ecg/prod", SecretString="{}")["ARN"]
    cloudformation = aws.client("cloudformation", settings)
    cloudformation.create_stack(
        StackName=STACK,
        TemplateBody=TEMPLATE.read_text(),
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[
            {"ParameterKey": "ImageId", "ParameterValue": "ami-12c6146b"},
            {"ParameterKey": "Subnets", "ParameterValue": ",".join(subnets)},
            {"ParameterKey": "SecurityGroupIds", "ParameterValue": security_group},
            {"ParameterKey": "SecretArn", "ParameterValue": secret_arn},
        ],
    )
    described = cloudformation.describe_stacks(StackName=STACK)["Stacks"][0]
    assert described["StackStatus"] == "CREATE_COMPLETE", described.get("StackStatusReason")
    resources = cloudformation.list_stack_resources(StackName=STACK)["StackResourceSummaries"]
    return {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in resources if r["LogicalResourceId"]}


def test_stack_creates_the_worker_group(infra_settings: Settings, stack: dict[str, str]) -> None:
    group = aws.client("autoscaling", infra_settings).describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])[
        "AutoScalingGroups"
    ][0]
    assert (group["MinSize"], group["MaxSize"], group["DefaultCooldown"]) == (1, 5, 300)
    assert group["HealthCheckGracePeriod"] == 300
    assert [i["LifecycleState"] for i in group["Instances"]] == ["InService"]

    version = aws.client("ec2", infra_settings).describe_launch_template_versions(
        LaunchTemplateId=stack["WorkerLaunchTemplate"]
    )["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert version["InstanceType"] == "g4dn.xlarge"
    assert version["MetadataOptions"]["HttpTokens"] == "required"
    assert version["MetadataOptions"]["HttpPutResponseHopLimit"] == 2
    user_data = base64.b64decode(version["UserData"]).decode()
    assert f"ECG_WORKER_ASG_NAME={GROUP}" in user_data
    assert "ECG_SCALE_IN_PROTECTION=true" in user_data
    assert "docker run" in user_data and "--gpus all" in user_data
    assert "hf_" not in user_data and "API_KEYS" not in user_data  # secrets come from Secrets Manager


def test_worker_role_is_least_privilege(infra_settings: Settings, stack: dict[str, str]) -> None:
    iam = aws.client("iam", infra_settings)
    role = stack["WorkerRole"]
    names = iam.list_role_policies(RoleName=role)["PolicyNames"]
    statements = []
    for name in names:
        document = iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
        if isinstance(document, str):  # moto keeps a CloudFormation inline policy as the repr of a dict
            document = ast.literal_eval(document)
        statements += document["Statement"]
    allowed: dict[str, Any] = {}
    for statement in statements:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        for action in actions:
            allowed[action] = statement

    assert set(allowed) == {
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
        "s3:ListBucket",
        "cloudwatch:PutMetricData",
        "autoscaling:SetInstanceProtection",
        "secretsmanager:GetSecretValue",
        "ecr:BatchGetImage",
        "ecr:GetDownloadUrlForLayer",
        "ecr:BatchCheckLayerAvailability",
        "ecr:GetAuthorizationToken",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
    }
    bucket = stack["MediaBucket"]
    assert allowed["s3:GetObject"]["Resource"] == f"arn:aws:s3:::{bucket}/*"
    assert allowed["autoscaling:SetInstanceProtection"]["Resource"].endswith(f":autoScalingGroupName/{GROUP}")
    assert ":secret:ecg/prod" in allowed["secretsmanager:GetSecretValue"]["Resource"]
    assert allowed["cloudwatch:PutMetricData"]["Condition"] == {
        "StringEquals": {"cloudwatch:namespace": "ECG/AudioAnalysis"}
    }
    wildcard = {a for a, s in allowed.items() if s["Resource"] == "*"}
    assert wildcard == {"cloudwatch:PutMetricData", "ecr:GetAuthorizationToken"}  # no resource types exist


def test_bucket_lifecycle_rules(infra_settings: Settings, stack: dict[str, str]) -> None:
    rules = _template()["Resources"]["MediaBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    s3 = aws.client("s3", infra_settings)
    s3.put_bucket_lifecycle_configuration(  # moto's CloudFormation does not apply them; the API does
        Bucket=stack["MediaBucket"],
        LifecycleConfiguration={
            "Rules": [
                {
                    "ID": r["Id"],
                    "Status": r["Status"],
                    "Filter": {"Prefix": r["Prefix"]},
                    **({"Expiration": {"Days": r["ExpirationInDays"]}} if "ExpirationInDays" in r else {}),
                    **(
                        {
                            "Transitions": [
                                {"Days": t["TransitionInDays"], "StorageClass": t["StorageClass"]}
                                for t in r["Transitions"]
                            ]
                        }
                        if "Transitions" in r
                        else {}
                    ),
                }
                for r in rules
            ]
        },
    )
    applied = {
        r["Filter"]["Prefix"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=stack["MediaBucket"])["Rules"]
    }
    assert applied["temp/"]["Expiration"]["Days"] == 1
    # uploads live at least as long on S3 as the shim keeps them on a local disk
    assert applied["uploads/"]["Expiration"]["Days"] * 86400 >= Settings.model_fields["upload_ttl_s"].default
    assert applied["output/"]["Transitions"] == [{"Days": 30, "StorageClass": "STANDARD_IA"}]


def test_target_tracking_follows_the_published_metric(infra_settings: Settings, stack: dict[str, str]) -> None:
    properties = _resolve(
        _template()["Resources"]["BacklogTargetTracking"]["Properties"],
        {"WorkerGroup": GROUP, "BacklogTargetPerInstance": "4"},
    )
    autoscaling = aws.client("autoscaling", infra_settings)
    autoscaling.put_scaling_policy(
        PolicyName="backlog",
        AutoScalingGroupName=properties["AutoScalingGroupName"],
        PolicyType=properties["PolicyType"],
        EstimatedInstanceWarmup=properties["EstimatedInstanceWarmup"],
        TargetTrackingConfiguration={**properties["TargetTrackingConfiguration"], "TargetValue": 4.0},
    )
    policy = autoscaling.describe_policies(AutoScalingGroupName=GROUP)["ScalingPolicies"][0]
    spec = policy["TargetTrackingConfiguration"]["CustomizedMetricSpecification"]
    assert policy["EstimatedInstanceWarmup"] == 300

    publish(
        aws.client("cloudwatch", infra_settings),
        autoscaling,
        Backlog(waiting={"model": 4}),
        infra_settings.model_copy(update={"worker_asg_name": GROUP}),
    )

    listed = aws.client("cloudwatch", infra_settings).list_metrics(
        Namespace=spec["Namespace"], MetricName=spec["MetricName"], Dimensions=spec["Dimensions"]
    )["Metrics"]
    assert listed, "the policy tracks a series that queue_metrics.publish does not send"


def test_alarms_watch_series_the_workers_send(infra_settings: Settings, stack: dict[str, str]) -> None:
    resources = _template()["Resources"]
    alarms = {name: r["Properties"] for name, r in resources.items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    cloudwatch = aws.client("cloudwatch", infra_settings)
    for name, properties in alarms.items():
        cloudwatch.put_metric_alarm(AlarmName=name, **_resolve(properties, {"WorkerGroup": GROUP}))
    described = {a["AlarmName"]: a for a in cloudwatch.describe_alarms()["MetricAlarms"]}
    thresholds = {n: (a["MetricName"], a["ComparisonOperator"], a["Threshold"]) for n, a in described.items()}
    assert sorted(thresholds.values()) == [
        ("ErrorRate", "GreaterThanThreshold", 5.0),
        ("GPUUtilization", "LessThanThreshold", 30.0),
        ("MemoryUsage", "GreaterThanThreshold", 90.0),
        ("ProcessingTime", "GreaterThanThreshold", 300.0),
    ]

    class _Gpu:
        def utilization_percent(self) -> float:
            return 80.0

    metrics = JobMetrics(
        MetricBatcher(cloudwatch, "ECG/AudioAnalysis"),
        GROUP,
        gpu=_Gpu(),
        memory_percent=lambda: 40.0,
        gpu_sample_interval_s=0.01,
    )
    with metrics.stage("transcribe"):
        pass
    metrics.record_job(30.0, ok=True)
    metrics.close()

    sent = {
        (m["MetricName"], tuple(sorted((d["Name"], d["Value"]) for d in m["Dimensions"])))
        for m in cloudwatch.list_metrics(Namespace="ECG/AudioAnalysis")["Metrics"]
    }
    for alarm in described.values():
        watched = (alarm["MetricName"], tuple(sorted((d["Name"], d["Value"]) for d in alarm["Dimensions"])))
        assert watched in sent, f"{alarm['AlarmName']} watches {watched}, which no worker sends"
