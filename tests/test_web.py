"""visiontune.web: which requests the local pages answer, and the address they print.
A real `visiontune review --label` process listening on every interface: the URL it
prints answers, a request addressed to another host is refused with a JSON message that
says what was received and how to let it in, and an --allowed-host given as a URL or with
a port matches the name browsers send."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from conftest import ServerProcess, make_class_folders
from visiontune.errors import ConfigError
from visiontune.web import allowed_hosts, allowed_name, page_url


def _suggestions(tmp_path: Path) -> Path:
    pool = make_class_folders(tmp_path / "pool", {"red": 2, "green": 2})
    out = tmp_path / "to_label.csv"
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "prediction", "reason", "score"])
        w.writerows([f, "", "red", "typical", "1"] for f in sorted(pool.rglob("*.png")))
    return out


def test_a_wildcard_server_prints_an_address_that_answers_and_explains_a_refusal(tmp_path: Path) -> None:
    """Audit of issue 34, items 9-11: `--host 0.0.0.0` printed http://0.0.0.0:PORT/, which
    answered 400 "Invalid host header" (plain text, naming nothing); `--allowed-host
    http://box.lan:8001/` was accepted and never matched."""
    server = ServerProcess(["review", "--label", str(_suggestions(tmp_path)), "--host", "0.0.0.0",
                            "--allowed-host", "http://box.lan:8001/", "--allowed-host", "Labels.Example:9"],
                           tmp_path / "review.log")
    try:
        printed = re.search(r"review: (http://\S+)", server.output())
        assert printed and printed.group(1) == f"http://127.0.0.1:{server.port}/", server.output()
        address = printed.group(1).split("//")[1].split(":")[0]
        assert server.request("GET", "/", address=address, host=f"{address}:{server.port}")[0] == 200
        assert "--allowed-host NAME" in server.output() and "another machine" in server.output()
        assert server.request("GET", "/api/queue", host=f"box.lan:{server.port}")[0] == 200
        assert server.request("GET", "/api/queue", host="labels.example")[0] == 200
        status, answer = server.request("GET", "/api/queue", host=f"attacker.example:{server.port}")
        assert status == 400 and isinstance(answer, dict), answer
        detail = answer["detail"]
        assert f"'attacker.example:{server.port}'" in detail and "127.0.0.1" in detail and "box.lan" in detail
        assert "--allowed-host NAME" in detail
    finally:
        server.stop()


def test_names_are_reduced_to_what_a_host_header_holds() -> None:
    assert page_url("0.0.0.0", 8001) == "http://127.0.0.1:8001/" and page_url("::", 8001) == "http://[::1]:8001/"
    assert page_url("", 1) == "http://127.0.0.1:1/" and page_url("fe80::1", 80) == "http://[fe80::1]:80/"
    assert page_url("box.lan", 80) == "http://box.lan:80/"
    for given, name in (("box.lan:8001", "box.lan"), ("http://Box.lan", "box.lan"), ("https://box.lan:9/x", "box.lan"),
                        ("[::1]:8001", "[::1]"), ("fe80::1", "[fe80::1]"), ("http://[fe80::1]:8/", "[fe80::1]"),
                        ("*.example.com", "*.example.com"), ("*", "*"), ("box.lan/", "box.lan")):
        assert allowed_name(given) == name, given
    for bad in ("", "http://", "a*b", "*foo", "box.*.lan"):
        with pytest.raises(ConfigError, match="--allowed-host"):
            allowed_name(bad)
    assert allowed_hosts("::", ["box.lan:1"]) == ["localhost", "127.0.0.1", "[::1]", "box.lan"]
    assert allowed_hosts("127.0.0.1", ["*"]) == ["*"]
