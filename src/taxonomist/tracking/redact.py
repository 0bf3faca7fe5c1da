"""Secrets never reach MLflow (or the model card): what is redacted before a value is logged.

A tracking server is shared and its runs are read by people who should not get the
credentials of whoever launched them. Before any param, tag, run description or file written
for MLflow holds a value from the config or the environment, :func:`redact` replaces:

- the password (or a lone token) in a URI's user part: ``https://user:***@host/...``;
- the value of query parameters that carry credentials (``token``, ``key``, ``secret``,
  ``password``, ``signature``, ``sig``, ``credential``, AWS and Azure SAS signature keys);
- every occurrence of the value of an environment variable whose name says it is a secret
  (``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``, ``*API_KEY*``, ``*ACCESS_KEY*``,
  ``*CREDENTIAL*``, ``*PRIVATE*``; values of 6 characters or more).

Environment variables themselves are never logged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)
MIN_SECRET = 6
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^/\s:@]*)(?::(?P<password>[^/\s@]*))?@")
_QUERY = re.compile(
    r"(?P<key>[?&](?:[\w.\-]*(?:token|secret|password|passwd|api_?key|signature|credential)[\w.\-]*|sig|key|"
    r"X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token))=(?P<value>[^&#\s]*)",
    re.IGNORECASE,
)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment's secret-named variables (longest first)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET}
    return sorted(values, key=len, reverse=True)


def _userinfo(match: re.Match[str]) -> str:
    user, password = match["user"], match["password"]
    if password is not None:
        return f"{match['scheme']}{user}:{MASK}@"
    return f"{match['scheme']}{MASK}@" if user else match[0]


def redact(text: Any, secrets: list[str] | None = None) -> str:
    """``text`` as a string with credentials in URIs and known secret values masked (see the module docstring)."""
    out = str(text)
    for value in secret_values() if secrets is None else secrets:
        out = out.replace(value, MASK)
    out = _USERINFO.sub(_userinfo, out)
    return _QUERY.sub(lambda m: f"{m['key']}={MASK}", out)


def redact_all(values: Mapping[str, Any]) -> dict[str, str]:
    """:func:`redact` applied to every value (the environment read once)."""
    secrets = secret_values()
    return {k: redact(v, secrets) for k, v in values.items()}
