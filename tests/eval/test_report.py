"""The report opens in headless Chromium with no console errors, every image decodes, and its metrics table
matches metrics.json row for row."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from sr_ray.cli import main
from sr_ray.eval.report import COLUMNS, fmt

pytestmark = pytest.mark.slow


class TableRows(HTMLParser):
    """Cell texts of each <tr> of the table with id `table_id`."""

    def __init__(self, table_id: str):
        super().__init__()
        self.table_id, self.inside, self.rows, self.cell = table_id, False, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.inside = dict(attrs).get("id") == self.table_id
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        elif self.inside and tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def chromium_dom(path) -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "headless Chromium is needed: apt-get install -y chromium"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", "--enable-logging=stderr",
                           "--v=0", path.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def test_report_renders_in_chromium_and_matches_metrics(eval_run):
    run, _ = eval_run
    assert main(["report", str(run)]) == 0
    html = run / "report.html"
    source = html.read_text()
    assert "src=\"plots/" not in source and source.count("data:image/png;base64,") >= 4  # self-contained
    dom, log = chromium_dom(html)
    assert ":CONSOLE" not in log, [line for line in log.splitlines() if ":CONSOLE" in line]
    marker = re.search(r'<div id="render-check" data-images="(\d+)" data-decoded="(\d+)">', dom)
    assert marker, "the page's load script did not run"
    n_images, decoded = map(int, marker.groups())
    assert n_images == source.count("<img ") and decoded == n_images  # asr, categories, awareness, attack ...

    parser = TableRows("metrics")
    parser.feed(dom)
    header, *rows = parser.rows
    assert header == list(COLUMNS)
    metrics = json.loads((run / "metrics.json").read_text())
    expected = [[s, b, *(fmt(m.get(c)) for c in COLUMNS[2:])] for s, benches in metrics.items() for b, m in benches.items()]
    assert rows == expected
    md = html.with_suffix(".md").read_text()
    assert "## Goal check" in md and "| figstep |" in md and "advbench_pgd" in md


def test_the_goal_check_pools_benign_refusal_and_how_flagged_answers_end():
    from sr_ray.eval.report import goal_rows

    def m(n, asr=None, refusal=0.0, flag=0.0, stop=None):
        return dict(n=n, asr_full=asr, refusal_rate=refusal, changed_vs_undefended=0.0, intervention_rate=flag,
                    flagged_stop_rate=stop)

    metrics = {"undefended": {"advbench": m(10, asr=1.0), "harmless": m(10, refusal=0.1)},
               "safety_reminder": {"advbench": m(10, asr=0.1, flag=0.8, stop=1.0),  # 8 flagged, all end
                                   "harmless": m(10, refusal=0.04, flag=0.2, stop=0.5)}}  # 2 flagged, 1 ends
    rows = {r["name"]: r for r in goal_rows(metrics)}
    assert rows["safety_reminder: relative ASR cut"]["met"] is True
    assert rows["safety_reminder: benign refusal"]["met"] is True
    assert rows["safety_reminder: flagged answers that end (EOS)"]["value"] == fmt(0.9)
    assert rows["safety_reminder: flagged answers that end (EOS)"]["met"] is True
