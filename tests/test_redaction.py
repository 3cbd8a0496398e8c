"""Credentials in URIs never reach a log line, a param or config.yaml: golf_dist.tracking.redact hides the
userinfo (tests/test_hardening.py) and, tested here, every credential parameter of a URI's query (libpq's
`postgresql://user@host/db?password=...`, tokens, keys, presigned signatures), whatever its case or
percent-encoding; the other parameters and URIs without credentials are left as they are."""

from __future__ import annotations

import pytest
import yaml

from golf_dist.tracking import redact, redact_config_dict

SECRET = "hunter2-x9"


@pytest.mark.parametrize(
    "text, shown",
    [
        (f"postgresql://mlflow@db:5432/mlflow?password={SECRET}", "postgresql://***@db:5432/mlflow?password=***"),
        (
            f"postgresql://db/mlflow?sslmode=require&sslpassword={SECRET}&application_name=golf",
            "postgresql://db/mlflow?sslmode=require&sslpassword=***&application_name=golf",
        ),
        (f"postgresql://db/m?PASSWORD={SECRET}", "postgresql://db/m?PASSWORD=***"),
        (f"postgresql://db/m?password=ab#{SECRET}&x=1", "postgresql://db/m?password=***&x=1"),  # '#' in the password
        (f"postgresql://db/m?pass%77ord={SECRET}", "postgresql://db/m?pass%77ord=***"),  # libpq decodes the name
        (f"mysql://db/m?passwd={SECRET};pwd={SECRET}", "mysql://db/m?passwd=***;pwd=***"),
        (f"https://mlflow.example/api?token={SECRET}&x=1", "https://mlflow.example/api?token=***&x=1"),
        (
            f"s3://bucket/key?X-Amz-Credential={SECRET}&X-Amz-Security-Token={SECRET}&X-Amz-Signature={SECRET}",
            "s3://bucket/key?X-Amz-Credential=***&X-Amz-Security-Token=***&X-Amz-Signature=***",
        ),
        (
            f"https://h/x?access_key={SECRET}&secret={SECRET}&api_key={SECRET}",
            "https://h/x?access_key=***&secret=***&api_key=***",
        ),
        # the value goes up to the next blank: a closing quote too (a password may hold one)
        (
            f"failed: 'postgresql://u@db/m?password={SECRET}' (retrying)",
            "failed: 'postgresql://***@db/m?password=*** (retrying)",
        ),
        (f"https://u:p?password={SECRET}@host/a", "https://***@host/a"),  # a '?' in the userinfo's password
        ("sqlite:///mlflow.db?mode=ro&cache=shared", "sqlite:///mlflow.db?mode=ro&cache=shared"),
        ("https://github.com/org/repo@v1?tab=readme", "https://github.com/org/repo@v1?tab=readme"),
    ],
)
def test_redact_hides_credentials_in_the_query(text, shown):
    assert redact(text) == shown
    assert SECRET not in redact(text)


def test_config_yaml_and_params_lose_a_query_password():
    """What the trainer dumps to config.yaml and logs as params goes through redact_config_dict."""
    cfg = {
        "tracking": {"uri": f"postgresql://mlflow@db/mlflow?password={SECRET}"},
        "data": {"shards": f"s3://bucket/set?X-Amz-Signature={SECRET}"},
    }
    dumped = yaml.safe_dump(redact_config_dict(cfg))
    assert SECRET not in dumped and "password=***" in dumped and "X-Amz-Signature=***" in dumped
