"""One set of ports across the README and the docs (issue 17): the README's tour is the
reference (scheduler 127.0.0.1:7000, servers 7001 and 7002); a loopback address anywhere in
the README, docs/ or examples/ is one of the tour's (or 7003, a replacement server in the
tour), a packaged server's 7100 dialled inside its own container, or the metrics port that
docs/deploy.md forwards from Kubernetes. And psctl's own default --listen is the tour's."""
from __future__ import annotations

import pathlib
import re

from shardps.psctl import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOUR = {7000, 7001, 7002, 7003}
PACKAGED = {7100, 9100}
LOOPBACK = re.compile(r"(?:127\.0\.0\.1|localhost):(\d+)")


def _pages():
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").glob("*.md"))
    yield from sorted((ROOT / "examples").glob("*.py"))


def test_every_loopback_port_in_the_docs_is_the_tours():
    odd = [(p.relative_to(ROOT).as_posix(), m.group(0)) for p in _pages()
           for m in LOOPBACK.finditer(p.read_text()) if int(m.group(1)) not in TOUR | PACKAGED]
    assert odd == []


def test_the_readme_tour_uses_7000_7001_7002_and_deploy_repeats_it():
    readme = (ROOT / "README.md").read_text()
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    for line in ("psctl scheduler --listen 127.0.0.1:7000 --servers 2",
                 "psctl server --scheduler 127.0.0.1:7000 --listen 127.0.0.1:7001 --shard-id 0",
                 "psctl server --scheduler 127.0.0.1:7000 --listen 127.0.0.1:7002 --shard-id 1"):
        assert line in readme and line in deploy, line
    scheduler = cli.build_parser().parse_args(["scheduler"])
    assert scheduler.listen == "127.0.0.1:7000"
