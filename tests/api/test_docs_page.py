"""/docs with no internet (issue 16): Swagger UI is served from the package, so the page renders
the operations in a headless Chromium that can reach nothing but the server."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import ServerFactory

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/ensure-engines.sh "
                                             "installs Debian's chromium)")
def test_docs_render_offline(server_factory: ServerFactory) -> None:
    server = server_factory().start()
    assert CHROMIUM is not None
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         # every host but the server's resolves to nothing: a CDN could not be reached
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         "--virtual-time-budget=15000", "--dump-dom", f"{server.url}/docs"],
        capture_output=True, text=True, timeout=90)
    dom = run.stdout
    assert 'data-path="/v1/like"' in dom, (run.returncode, dom[-2000:], run.stderr[-2000:])
    assert 'data-path="/v1/admin/reconcile"' in dom
