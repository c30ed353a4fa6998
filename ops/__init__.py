"""Operations beside the job core: AWS clients and secrets, CloudWatch metrics, the local stack."""
