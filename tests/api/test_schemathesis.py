"""The OpenAPI document against the API (issue 16): Schemathesis (pinned in the dev extra) runs
every check it has (``--checks all``: status codes and content types documented, responses
matching their schemas, schema-valid requests accepted and invalid ones refused, 401 without
the credential, 405 with Allow) over a real server with an admin token and a keys file, on a
bounded, deterministic budget. It passes only with zero failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ServerFactory

TOKEN = "admin-token-0123456789"
EXAMPLES = 15  # per operation and phase: about 600 requests, under a minute here


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_schemathesis_finds_nothing(server_factory: ServerFactory, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[[key]]\nname = "st"\nkey = "schemathesis-key-0123456789"\n')
    server = server_factory(env={"TALLY_ADMIN_TOKEN": TOKEN, "TALLY_API_KEYS_FILE": str(keys),
                                 "TALLY_RATE_PER_USER": "0"}).start()
    st = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [str(st), "run", f"{server.url}/openapi.json", "--checks", "all",
         "--max-examples", str(EXAMPLES), "--generation-deterministic",
         "-H", f"Authorization: Bearer {TOKEN}", "--request-timeout", "20",
         "--report-dir", str(tmp_path / "reports")],
        capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout
