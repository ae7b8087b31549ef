"""agent.log: what a log line carries, read from a real process's stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_log_line_names_the_module_that_wrote_it():
    program = (
        "from agent.log import configure_logging, get_logger\n"
        "configure_logging('info', json=True)\n"
        "get_logger('agent.fetch.downloader').info('fetch_complete', size=3)\n"
        "get_logger('agent.daemon').warning('model_missing')\n"
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True,
                            text=True, check=True)

    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(line["logger_name"], line["event"]) for line in lines] == [
        ("agent.fetch.downloader", "fetch_complete"), ("agent.daemon", "model_missing")]
    assert lines[0]["size"] == 3
