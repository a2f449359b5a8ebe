"""infra.errors.environment_problem: the exceptions that say the machine's surroundings are
wrong (checked against botocore's own classes) become one line; anything else stays a
traceback."""

from __future__ import annotations

import botocore.exceptions as boto

from infra.errors import environment_problem


def test_object_store_errors_are_one_line_naming_the_fix():
    missing = environment_problem(boto.NoCredentialsError())
    assert missing.startswith("the object store found no credentials (NoCredentialsError)")
    assert "AWS_ACCESS_KEY_ID" in missing and "\n" not in missing

    down = environment_problem(boto.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b"))
    assert down == (
        "the object store does not answer (Could not connect to the endpoint URL: "
        '"http://127.0.0.1:9/b"); check storage.endpoint_url and that the store runs'
    )
    refused = environment_problem(
        boto.ClientError({"Error": {"Code": "NoSuchBucket", "Message": "gone"}}, "PutObject")
    )
    assert refused.startswith("the object store refused the request (ClientError: An error")


def test_paths_the_process_cannot_use_name_the_path():
    error = PermissionError(13, "Permission denied", "/data/runs")
    assert environment_problem(error) == (
        "/data/runs: Permission denied; check the path and its permissions"
    )


def test_other_exceptions_keep_their_traceback():
    assert environment_problem(ValueError("a bug")) is None
    assert environment_problem(KeyError("x")) is None
    assert environment_problem(OSError("no errno, no strerror")) is None
