"""The ``tally`` command against a real server process: output, exit codes, errors, demo."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tally.cli import main
from tally_dev.engines import free_port
from tests.conftest import ServerProcess
from tests.helpers import db_exec, db_rows, poll_sync


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module: each test uses its own items."""
    s = ServerProcess(tmp_path_factory.mktemp("cli") / "data",
                      env={"TALLY_AGGREGATE_WINDOW_MS": "5"})
    s.start()
    yield s
    s.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refuses the command line itself
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def tally(server: ServerProcess, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, "--url", server.url, *argv)
    assert code == 0, err
    return orjson.loads(out)


def test_like_unlike_count_has(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert tally(server, capsys, "like", "1", "post:c1") == {"state": True, "changed": True,
                                                             "count": 1}
    assert tally(server, capsys, "like", "u-2", "post:c1")["count"] == 2
    assert tally(server, capsys, "like", "1", "post:c1")["changed"] is False
    assert tally(server, capsys, "unlike", "u-2", "post:c1") == {"state": False, "changed": True,
                                                                 "count": 1}
    assert tally(server, capsys, "like", "1", "reel:c1", "--counter", "save")["count"] == 1
    assert tally(server, capsys, "has", "1", "post:c1", "post:c2", "reel:c1") == {
        "post:c1": True, "post:c2": False, "reel:c1": False}
    assert tally(server, capsys, "has", "1", "reel:c1", "--counter", "save") == {"reel:c1": True}
    counts = tally(server, capsys, "count", "post:c1", "post:c2", "--counter", "like")
    assert counts[1] == {"item": "post:c2", "counts": {"like": 0}}
    assert counts[0]["item"] == "post:c1" and counts[0]["counts"]["like"] in (0, 1)  # eventual


def test_incr(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert tally(server, capsys, "incr", "view", "post:c3", "-n", "3", "--key", "k1") == {
        "applied": True, "count": 3}
    assert tally(server, capsys, "incr", "view", "post:c3", "-n", "3", "--key", "k1") == {
        "applied": False, "count": 3}
    assert tally(server, capsys, "incr", "share", "post:c3") == {"applied": True, "count": 1}


@pytest.mark.parametrize(("argv", "needle"), [
    (["like", "1", "nope:1"], "(field item_type)"),
    (["like", "a b", "post:1"], "(field user_id)"),
    (["like", "99999999999999999999", "post:1"], "(field user_id)"),
    (["incr", "view", "post:1", "-n", "0"], "(field n)"),
    (["incr", "like", "post:1"], "(field counter)"),
    (["has", "1", "post:1", "--counter", "view"], "(field counter)"),
    (["count", "post:1", "--counter", "nope"], "(field counters[0])"),
])
def test_refused_by_the_server(server: ServerProcess, capsys: pytest.CaptureFixture[str],
                               argv: list[str], needle: str) -> None:
    code, out, err = run(capsys, "--url", server.url, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("tally: 422 ") and needle in err


@pytest.mark.parametrize("argv", [["like", "1", "post"], ["like", "1"], ["incr", "view", "post:1",
                                                                          "-n", "x"], ["frobnicate"]])
def test_bad_command_lines(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2 and "usage: tally" in err


def test_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["like", "1", "post:1"], ["count", "post:1"], ["reconcile"]):
        code, _, err = run(capsys, "--url", url, *argv)
        assert code == 3 and err.startswith(f"tally: cannot reach {url}"), err


def test_reconcile(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    for user in range(3):
        tally(server, capsys, "like", str(user), "post:r1")
    db = server.data_dir / "tally.db"

    def poll_applied() -> None:
        poll_sync(lambda: db_rows(db, "SELECT count FROM counts WHERE item='post:r1' "
                                      "AND counter='like'") == [(3,)])

    poll_applied()
    db_exec(db, "UPDATE counts SET count=40 WHERE item='post:r1' AND counter='like'")
    code, out, _ = run(capsys, "--url", server.url, "reconcile")
    assert code == 0
    assert "drift like post:r1: stored 40, recount 3" in out
    assert "1 drifted and found (dry run, nothing changed" in out
    code, out, _ = run(capsys, "--url", server.url, "reconcile", "--repair", "post:r1", "post:zz")
    assert code == 0 and "1 drifted and repaired" in out
    poll_applied()
    code, out, _ = run(capsys, "--url", server.url, "reconcile", "--repair")
    assert code == 0 and ", 0 drifted and repaired" in out


def test_config(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text("[tally]\nport = 9999\n")
    code, out, _ = run(capsys, "config", "--config", str(cfg))
    assert code == 0
    assert any(line.split()[:4] == ["server", "port", "TALLY_PORT", "9999"]
               for line in out.splitlines())
    code, out, _ = run(capsys, "config", "--markdown")
    assert code == 0 and "**storage**" in out and "| `sqlite_synchronous` |" in out
    monkeypatch.setenv("TALLY_ITEM_TYPES", "Post")
    code, out, err = run(capsys, "config")
    assert (code, out) == (2, "") and err.startswith("tally: configuration error: item_types")
    monkeypatch.setenv("TALLY_ITEM_TYPES", "post")
    monkeypatch.setenv("TALLY_PROT", "1")  # not a setting: ignored
    assert run(capsys, "config")[0] == 0


def test_demo(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--url", server.url, "demo", "--users", "300", "--items", "50")
    assert code == 0, out + err
    assert "counts match the operations sent" in out
    assert "operations" in err  # the progress line


def test_exit_codes_of_the_real_command(server: ServerProcess) -> None:
    ok = subprocess.run([sys.executable, "-m", "tally.cli", "--url", server.url, "count",
                         "post:x1"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and orjson.loads(ok.stdout)[0]["counts"]["like"] == 0
    bad = subprocess.run([sys.executable, "-m", "tally.cli", "--url", server.url, "like", "1",
                          "nope:1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "field item_type" in bad.stderr and not bad.stdout


@pytest.mark.parametrize(("typed", "other"), [("1_000", "1000"), ("007", "7"), ("+5", "5")])
def test_ids_are_taken_as_typed(server: ServerProcess, capsys: pytest.CaptureFixture[str],
                                typed: str, other: str) -> None:
    """Only a canonical decimal is an int64: '1_000' or '007' are string ids of their own."""
    item = f"post:ids{other}"
    code, _, err = run(capsys, "--url", server.url, "like", typed, item)
    if typed.startswith("+"):  # not a valid string id either: refused, not turned into 5
        assert code == 2 and "(field user_id)" in err
        return
    assert code == 0, err
    assert tally(server, capsys, "has", typed, item) == {item: True}
    assert tally(server, capsys, "has", other, item) == {item: False}
    assert tally(server, capsys, "like", "1", f"post:{typed}")["count"] == 1
    assert tally(server, capsys, "has", "1", f"post:{typed}", f"post:{other}") == {
        f"post:{typed}": True, f"post:{other}": False}


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[tally]\naggregate_window_ms = 'fast'\n")
    r = subprocess.run([sys.executable, "-m", "tally.cli", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "tally: configuration error: aggregate_window_ms: expected float, got str"


@pytest.mark.parametrize("argv", [[], ["serve"], ["like"], ["reconcile"], ["demo"], ["config"],
                                  ["bench"], ["bench", "run"], ["bench", "suite"], ["cluster"]])
def test_every_help_page_renders(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    assert "usage: tally" in capsys.readouterr().out


def test_blocking_client_reads_a_feed(server: ServerProcess) -> None:
    """The CLI's client, by the call it has and the CLI does not use: one request per feed."""
    from tally.client import FeedItem, Tally

    with Tally(server.url) as t:
        t.like("feed-user", "post", "feed-1")
        want = [FeedItem({"like": 1}, {"like": True}), FeedItem({"like": 0}, {"like": False})]
        poll_sync(lambda: t.feed("feed-user", [("post", "feed-1"), ("post", "feed-2")],
                                 ["like"]) == want)
