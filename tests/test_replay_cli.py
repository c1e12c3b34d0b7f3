"""`exposure replay`: the shared scenarios, reference data, and unreadable input."""

import subprocess
import sys

import orjson
import pytest
from support import DATA, SCENARIOS, load_expected

from exposure.engine.document import compare_documents, document
from exposure.engine.parse import read_events
from exposure.engine.replay import replay_records


def _replay_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exposure", "replay", *args],
                          capture_output=True, timeout=300)


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_shared_scenario_replays_to_its_expected_document(name):
    doc = document(replay_records(read_events(DATA / f"{name}.jsonl")))
    assert compare_documents(doc, load_expected(name)) == []


@pytest.mark.process
def test_the_command_prints_the_expected_document_for_each_scenario():
    for name in SCENARIOS:
        p = _replay_cli(str(DATA / f"{name}.jsonl"))
        assert p.returncode == 0, p.stderr.decode()
        assert compare_documents(orjson.loads(p.stdout), load_expected(name)) == []


@pytest.mark.process
def test_an_unreadable_events_file_is_one_line_and_status_2(tmp_path):
    p = _replay_cli(str(tmp_path / "missing.jsonl"))
    assert p.returncode == 2
    err = p.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "missing.jsonl" in err
    (tmp_path / "dir.jsonl").mkdir()
    p = _replay_cli(str(tmp_path / "dir.jsonl"))
    assert p.returncode == 2 and len(p.stderr.decode().strip().splitlines()) == 1


@pytest.mark.process
def test_reference_csv_is_applied_before_the_stream(tmp_path):
    ref = tmp_path / "ref.csv"
    ref.write_text("instrument,multiplier,margin_rate,beta,sector\n7,100,0.5,2.0,9\n"
                   "8,abc,0.1,1,1\n")
    ev = tmp_path / "ev.jsonl"
    ev.write_text('{"type":"position","account":1,"instrument":7,"qty":3,"price":10}\n'
                  '{"type":"mark","instrument":7,"price":12}\n')
    p = _replay_cli(str(ev), "--instruments", str(ref))
    assert p.returncode == 0, p.stderr.decode()
    doc = orjson.loads(p.stdout)
    acc = doc["accounts"][0]
    assert acc["long_mv"] == pytest.approx(3 * 12 * 100)
    assert acc["margin"] == pytest.approx(3 * 12 * 100 * 0.5)
    assert acc["beta_net"] == pytest.approx(3 * 12 * 100 * 2.0)
    assert acc["pnl"] == pytest.approx(100 * (3 * 12 - 3 * 10))
    assert doc["sectors"] == [{"sector": 9, "net_mv": 3600.0, "gross_mv": 3600.0}]
    assert doc["counts"]["rejects"] == {"bad_field": 1}  # the row with multiplier "abc"


@pytest.mark.process
def test_a_reference_csv_with_a_wrong_header_is_a_clear_error(tmp_path):
    ref = tmp_path / "ref.csv"
    ref.write_text("id,mult\n1,2\n")
    p = _replay_cli(str(DATA / "basic.jsonl"), "--instruments", str(ref))
    assert p.returncode == 2 and b"header must be" in p.stderr


@pytest.mark.process
def test_blank_lines_are_skipped_and_garbage_lines_counted(tmp_path):
    ev = tmp_path / "ev.jsonl"
    ev.write_bytes(b'\n  \n{"type":"mark","instrument":1,"price":2}\nnot json\n[1,2]\n'
                   b'{"type":"mark","instrument":1,"price":NaN}\n\xff\xfe\n')
    p = _replay_cli(str(ev))
    assert p.returncode == 0, p.stderr.decode()
    counts = orjson.loads(p.stdout)["counts"]
    assert counts == {"accepted": 1, "rejected": 4, "late_fills": 0, "busts": 0, "rolls": 0,
                      "rejects": {"bad_field": 4}}
