"""Property-based run of the whole API against its own OpenAPI document.

schemathesis reads ``/api/v1/openapi.json`` from a live server, generates
requests for every operation (valid ones and ones that break the schema)
and checks each answer: no 5xx, a documented status, content type and
headers, a body that fits the documented schema, and a 4xx for every
request that does not fit the schema. Bounded and derandomized: 20
examples per operation and mode. Logout is left out (it would revoke the
token the run uses; its own tests cover it), and role changes run last
so that the other operations are exercised with the admin's full rights.
"""

from __future__ import annotations

from collections.abc import Callable

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import API, ApiServer

EXAMPLES = 20
SKIPPED = {("POST", f"{API}/auth/logout")}
LAST = ("PUT", f"{API}/roles/{{role}}")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _negative_data_refused(
    ctx: CheckContext, response: Response, case: schemathesis.Case
) -> bool | None:
    # A schema-breaking body over 1 MiB is refused with 413 before it is
    # parsed: that is a refusal too.
    if response.status_code == 413:
        return None
    return negative_data_rejection(ctx, response, case)


def test_the_api_keeps_to_its_document(make_server: Callable[..., ApiServer]) -> None:
    api = make_server(security={"source_failure_limit": 1_000_000})
    headers = api.admin()
    schema = schemathesis.openapi.from_url(f"{api.url}{API}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [
        op for op in operations if (op.method.upper(), op.path) not in SKIPPED
    ]
    operations.sort(key=lambda op: (op.method.upper(), op.path) == LAST)
    assert len(operations) >= 30

    failures: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(operation, mode, api.url, headers)
            except Unsatisfiable:
                # An operation without parameters or body has no invalid
                # input to generate.
                if not mode.is_negative:
                    failures.append(f"{operation.method.upper()} {operation.path}")
            except Exception as exc:
                label = f"{operation.method.upper()} {operation.path} ({mode.value})"
                failures.append(f"{label}: {exc}")

    assert not failures, "\n\n".join(failures)


def _fuzz(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    url: str,
    headers: dict[str, str],
) -> None:
    checks = CHECKS + ([_negative_data_refused] if mode.is_negative else [])

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=url, headers=headers, checks=checks)

    run()
