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
from ecg_audio.stage_table import STAGE_NAMES as CHAIN_STAGES
from ops import aws
from ops.job_metrics import JobMetrics, MetricBatcher
from ops.queue_metrics import Backlog, publish
from tests.helpers import aws_settings, reset_moto

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


def _resolve(value: Any, refs: dict[str, Any]) -> Any:
    """Just the intrinsics the alarm and policy properties use."""
    if isinstance(value, dict):
        if set(value) == {"Ref"}:
            return refs[value["Ref"]]
        if set(value) == {"Fn::If"}:
            return None  # no alarm topic in the test
        if set(value) == {"Fn::Sub"}:
            text = value["Fn::Sub"]
            for name, replacement in refs.items():
                text = text.replace("${" + name + "}", str(replacement))
            assert "${" not in text, text
            return text
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
    # the stream worker beside the Celery worker, its slots from the stack (default 2)
    assert 'if [ "2" -gt 0 ]' in user_data
    assert "ECG_STREAM_SLOTS=2" in user_data and user_data.rstrip().endswith("python -m worker.stream\nfi")


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
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:RecordLifecycleActionHeartbeat",
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
    for action in ("SetInstanceProtection", "CompleteLifecycleAction", "RecordLifecycleActionHeartbeat"):
        assert allowed[f"autoscaling:{action}"]["Resource"].endswith(f":autoScalingGroupName/{GROUP}")
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


def test_live_streams_scale_the_group_too(infra_settings: Settings, stack: dict[str, str]) -> None:
    """A second target tracking policy follows the share of stream slots in use, a series the
    publisher sends; without stream slots (StreamSlotsPerInstance 0) there is no such policy."""
    template = _template()
    resource = template["Resources"]["StreamSlotsTargetTracking"]
    assert resource["Condition"] == "HasStreams"
    assert template["Conditions"]["HasStreams"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "StreamSlotsPerInstance"}, 0]}]}
    properties = _resolve(resource["Properties"], {"WorkerGroup": GROUP, "StreamSlotTargetPercent": "60"})
    autoscaling = aws.client("autoscaling", infra_settings)
    autoscaling.put_scaling_policy(
        PolicyName="streams",
        AutoScalingGroupName=properties["AutoScalingGroupName"],
        PolicyType=properties["PolicyType"],
        EstimatedInstanceWarmup=properties["EstimatedInstanceWarmup"],
        TargetTrackingConfiguration={**properties["TargetTrackingConfiguration"], "TargetValue": 60.0},
    )
    policies = autoscaling.describe_policies(AutoScalingGroupName=GROUP, PolicyNames=["streams"])["ScalingPolicies"]
    spec = policies[0]["TargetTrackingConfiguration"]["CustomizedMetricSpecification"]

    publish(
        aws.client("cloudwatch", infra_settings),
        autoscaling,
        Backlog(waiting={"model": 0}),
        infra_settings.model_copy(update={"worker_asg_name": GROUP}),
        stream_slots=(2, 0),
    )

    listed = aws.client("cloudwatch", infra_settings).list_metrics(
        Namespace=spec["Namespace"], MetricName=spec["MetricName"], Dimensions=spec["Dimensions"]
    )["Metrics"]
    assert listed, "the stream policy tracks a series that queue_metrics.publish does not send"


# what the alarms' !Ref and !Sub name, as the test stack and its workers see them
ALARM_REFS: dict[str, Any] = {
    "WorkerGroup": GROUP,
    "AWS::StackName": STACK,
    "ImageTag": "v2",
    "DeployMinJobs": 3,
    "DeployFailureRatePercent": 10,
}


def _watched(alarm: dict[str, Any]) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """(metric name, sorted dimensions) of each series an alarm reads, metric math included."""
    metrics = [q["MetricStat"]["Metric"] for q in alarm.get("Metrics", []) if "MetricStat" in q]
    if "MetricName" in alarm:
        metrics.append(alarm)
    return [(m["MetricName"], tuple(sorted((d["Name"], d["Value"]) for d in m["Dimensions"]))) for m in metrics]


def test_alarms_watch_series_the_workers_send(infra_settings: Settings, stack: dict[str, str]) -> None:
    resources = _template()["Resources"]
    alarms = {name: r["Properties"] for name, r in resources.items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    cloudwatch = aws.client("cloudwatch", infra_settings)
    for name, properties in alarms.items():
        cloudwatch.put_metric_alarm(AlarmName=name, **_resolve(properties, ALARM_REFS))
    described = {a["AlarmName"]: a for a in cloudwatch.describe_alarms()["MetricAlarms"]}
    thresholds = {
        n: (a.get("MetricName", "math"), a["ComparisonOperator"], a["Threshold"]) for n, a in described.items()
    }
    assert sorted(thresholds.values()) == [
        ("ErrorRate", "GreaterThanThreshold", 5.0),
        ("GPUUtilization", "LessThanThreshold", 30.0),
        ("MemoryUsage", "GreaterThanThreshold", 90.0),
        ("ProcessingTime", "GreaterThanThreshold", 300.0),
        ("math", "GreaterThanThreshold", 10.0),
    ]

    class _Gpu:
        def utilization_percent(self) -> float:
            return 80.0

        def memory_used_mib(self) -> float:
            return 9000.0

    # a worker of image v2 (ECG_IMAGE_VERSION, which the user data sets to ImageTag) runs
    # stages through the Celery signals' entry points: one job completes, one crashes
    metrics = JobMetrics(
        MetricBatcher(cloudwatch, "ECG/AudioAnalysis"),
        GROUP,
        gpu=_Gpu(),
        memory_percent=lambda: 40.0,
        gpu_sample_interval_s=0.01,
        image_version="v2",
    )
    for stage in CHAIN_STAGES:
        metrics.stage_started(f"ok-{stage}", stage)
        metrics.stage_finished(f"ok-{stage}", ok=True)
    metrics.record_job_time(31.5)  # what the worker's completion hook sends (tasks.context.job_completed)
    metrics.stage_started("crash-diarize", "diarize")
    metrics.stage_finished("crash-diarize", ok=False, error_code="STAGE_CRASHED")
    metrics.close()

    sent = {
        (m["MetricName"], tuple(sorted((d["Name"], d["Value"]) for d in m["Dimensions"])))
        for m in cloudwatch.list_metrics(Namespace="ECG/AudioAnalysis")["Metrics"]
    }
    for alarm in described.values():
        for watched in _watched(alarm):
            assert watched in sent, f"{alarm['AlarmName']} watches {watched}, which no worker sends"
    deploy = described["DeployFailureAlarm"]
    assert {m for m, _ in _watched(deploy)} == {"FleetFailures", "JobsFailed", "JobsCompleted", "StageCrashes"}
    assert all(("ImageVersion", "v2") in dims for _, dims in _watched(deploy))
    user_data = resources["WorkerLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]
    assert "ECG_IMAGE_VERSION=${ImageTag}" in user_data["Fn::Sub"]


def test_spot_above_an_on_demand_base(infra_settings: Settings, stack: dict[str, str]) -> None:
    group = aws.client("autoscaling", infra_settings).describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])[
        "AutoScalingGroups"
    ][0]
    policy = group["MixedInstancesPolicy"]
    assert policy["InstancesDistribution"]["OnDemandBaseCapacity"] == 1
    assert policy["InstancesDistribution"]["OnDemandPercentageAboveBaseCapacity"] == 0
    assert policy["InstancesDistribution"]["SpotAllocationStrategy"] == "price-capacity-optimized"
    types = [o["InstanceType"] for o in policy["LaunchTemplate"]["Overrides"]]
    assert types == ["g4dn.xlarge", "g5.xlarge", "g6.xlarge"]
    # moto's CloudFormation does not carry CapacityRebalance over; the template must say it
    assert _template()["Resources"]["WorkerGroup"]["Properties"]["CapacityRebalance"] is True


def test_the_termination_hook_is_the_one_the_workers_complete(infra_settings: Settings, stack: dict[str, str]) -> None:
    resources = _template()["Resources"]
    (hook,) = resources["WorkerGroup"]["Properties"]["LifecycleHookSpecificationList"]
    user_data = resources["WorkerLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]
    assert f"ECG_LIFECYCLE_HOOK_NAME={hook['LifecycleHookName']}" in user_data["Fn::Sub"]
    assert "ECG_INTERRUPTION_WATCH=true" in user_data["Fn::Sub"]
    autoscaling = aws.client("autoscaling", infra_settings)
    autoscaling.put_lifecycle_hook(AutoScalingGroupName=GROUP, **hook)  # moto's CloudFormation skips the list
    (described,) = autoscaling.describe_lifecycle_hooks(AutoScalingGroupName=GROUP)["LifecycleHooks"]
    assert described["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    # the worker may wait lifecycle_drain_s for a stage: the hook must wait longer
    assert described["HeartbeatTimeout"] > Settings.model_fields["lifecycle_drain_s"].default
    assert described["DefaultResult"] == "CONTINUE"


def test_deploys_keep_the_minimum_healthy_percentage(infra_settings: Settings, stack: dict[str, str]) -> None:
    condition, staged, rolling = _template()["Resources"]["WorkerGroup"]["UpdatePolicy"]["AutoScalingRollingUpdate"][
        "Fn::If"
    ]
    # DeployStrategy=staged drops the rolling update: the instance refresh replaces workers instead
    assert (condition, staged) == ("Staged", {"Ref": "AWS::NoValue"})
    assert rolling["MaxBatchSize"] == 1 and rolling["MinActiveInstancesPercent"] == {"Ref": "DeployMinHealthyPercent"}
    outputs = aws.client("cloudformation", infra_settings).describe_stacks(StackName=STACK)["Stacks"][0]["Outputs"]
    preferences = json.loads(next(o["OutputValue"] for o in outputs if o["OutputKey"] == "InstanceRefreshPreferences"))
    assert preferences["MinHealthyPercentage"] == 100
    # moto lacks StartInstanceRefresh: check the preferences against the service's own request model
    from botocore.validate import validate_parameters

    model = aws.client("autoscaling", infra_settings).meta.service_model.operation_model("StartInstanceRefresh")
    validate_parameters({"AutoScalingGroupName": GROUP, "Preferences": preferences}, model.input_shape)


def test_dashboard_shows_series_that_are_sent(infra_settings: Settings, stack: dict[str, str]) -> None:
    body = _template()["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    rendered = body.replace("${WorkerGroup}", GROUP).replace("${AWS::Region}", "us-east-1")
    rendered = rendered.replace("${BacklogTargetPerInstance}", "4")
    cloudwatch = aws.client("cloudwatch", infra_settings)
    cloudwatch.put_dashboard(DashboardName="ecg-test", DashboardBody=rendered)
    widgets = json.loads(cloudwatch.get_dashboard(DashboardName="ecg-test")["DashboardBody"])["widgets"]
    shown: set[str] = set()
    for widget in widgets:
        previous: list[Any] = []
        for row in widget["properties"]["metrics"]:
            if isinstance(row[0], dict):
                shown.add(row[0]["expression"].split('MetricName="')[1].split('"')[0])
                continue
            row = [previous[i] if v == "." else v for i, v in enumerate(row)]
            previous = row
            shown.add(row[1])
    assert shown == {
        "QueueLength",
        "BacklogPerInstance",
        "GroupInServiceInstances",
        "GroupDesiredCapacity",
        "ProcessingTime",
        "ErrorRate",
        "GPUUtilization",
        "GPUMemoryUsed",
        "GPUMemoryPeak",
        "CallbackDeadLetters",
    }
    stats = {w["properties"]["stat"] for w in widgets if "ProcessingTime" in json.dumps(w)}
    assert {"p50", "p90"} <= stats
    from celeryconfig import CHAIN

    staged = {
        row[5] for w in widgets for row in w["properties"]["metrics"] if not isinstance(row[0], dict) and len(row) > 5
    }
    assert {name.removeprefix("ecg.") for name in CHAIN} <= staged


def test_night_scale_down_is_an_option(moto_endpoint: str) -> None:
    reset_moto(moto_endpoint)
    settings = aws_settings(moto_endpoint)
    ec2 = aws.client("ec2", settings)
    subnets = [s["SubnetId"] for s in ec2.describe_subnets()["Subnets"]][:2]
    secret_arn = aws.client("secretsmanager", settings).create_secret(Name="ecg/night", SecretString="{}")["ARN"]
    cloudformation = aws.client("cloudformation", settings)
    cloudformation.create_stack(
        StackName="night",
        TemplateBody=TEMPLATE.read_text(),
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[
            {"ParameterKey": "ImageId", "ParameterValue": "ami-12c6146b"},
            {"ParameterKey": "Subnets", "ParameterValue": ",".join(subnets)},
            {
                "ParameterKey": "SecurityGroupIds",
                "ParameterValue": ec2.describe_security_groups()["SecurityGroups"][0]["GroupId"],
            },
            {"ParameterKey": "SecretArn", "ParameterValue": secret_arn},
            {"ParameterKey": "NightScaleDown", "ParameterValue": "true"},
            {"ParameterKey": "ScheduleTimeZone", "ParameterValue": "Asia/Seoul"},
        ],
    )
    actions = aws.client("autoscaling", settings).describe_scheduled_actions(AutoScalingGroupName="night-workers")[
        "ScheduledUpdateGroupActions"
    ]
    by_cron = {a["Recurrence"]: (a["MinSize"], a["MaxSize"]) for a in actions}
    assert by_cron == {"0 20 * * *": (0, 1), "0 7 * * 1-5": (1, 5)}
