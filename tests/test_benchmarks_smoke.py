"""Smoke tests for benchmarks/profile_step.py and benchmarks/bench_growth.py: a step or two on the tiny
preset, so that the scripts cannot rot. They check what the scripts print (tables, phase sums, fits),
not how fast anything is: timings are benchmarks, never tests."""

import json
import re
import statistics
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_growth
import profile_step


def markdown_rows(text: str, header_start: str) -> list[list[str]]:
    """The cells of the markdown table whose header line starts with ``header_start``, header and rule left out."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("*`") for cell in line.strip("|").split("|")])
    return rows


def run_benchmark(script: str, *args: str) -> str:
    """Run ``benchmarks/<script>`` with ``args`` as a user would; its stdout (it must exit 0)."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_profile_step_prints_operators_and_a_breakdown_that_adds_up(capsys):
    assert profile_step.main(["--preset", "tiny", "--warmup", "1", "--steps", "2", "--top", "5"]) == 0
    out = capsys.readouterr().out

    operators = markdown_rows(out, "| operator |")
    assert len(operators) == 5
    assert any(name.startswith("aten::") for name, *_ in operators)  # real torch operators were recorded
    assert not any(name.startswith("mmtrain::") for name, *_ in operators)  # the phase ranges are the breakdown
    self_ms = [float(row[2]) for row in operators]
    assert self_ms == sorted(self_ms, reverse=True) and self_ms[0] > 0

    rows = {row[0]: row[1:] for row in markdown_rows(out, "| phase |")}
    phases = [*profile_step.PHASES, profile_step.PHASE_LABELS[profile_step.OTHER]]
    assert list(rows) == [*phases, "sum of the rows", "measured step"]
    for column in (0, 2):  # no profiler, under torch.profiler
        ms = {name: float(rows[name][column]) for name in phases}
        measured = float(rows["measured step"][column])
        # Every phase this Trainer has is found and timed; "other" (measured minus the phases) is never
        # negative, which it would be if two phases counted the same time.
        for name in ("data wait", "forward", "backward", "clip", "optimizer", "telemetry"):
            assert ms[name] > 0, name
        assert ms[profile_step.PHASE_LABELS[profile_step.OTHER]] >= 0
        assert sum(ms.values()) == pytest.approx(measured, rel=0.01, abs=0.05)
        assert sum(v for k, v in ms.items() if k in profile_step.PHASES) <= measured + 0.01
        percents = [float(rows[name][column + 1].rstrip("%")) for name in phases]
        assert sum(percents) == pytest.approx(100, abs=0.5)
    assert "not found in this mmtrain" not in out  # every wrapped method still exists
    assert re.search(r"under torch\.profiler: phases [\d.]+ \+ other [\d.]+ = [\d.]+ ms = measured step", out)


def test_profile_step_refuses_an_unknown_preset_in_one_line(capsys):
    assert profile_step.main(["--preset", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--preset 'nosuch'" in err and "tiny" in err


def test_bench_growth_prints_both_axes_and_the_fit(capsys, tmp_path):
    # Two points: batch 8 and 16 at 32 px; tiny's own point (batch 16, 32 px) is also the image axis's one.
    argv = ["--preset", "tiny", "--batch-sizes", "8", "16", "--image-sizes", "32", "--rounds", "3",
            "--steps", "3", "--no-rss", "--no-png", "--figure-dir", str(tmp_path), "--raw", str(tmp_path / "raw.json")]
    assert bench_growth.main(argv) == 0
    out = capsys.readouterr().out
    rows = markdown_rows(out, "| axis |")
    assert [(r[0], int(r[1]), int(r[2])) for r in rows] == [
        ("batch size", 8, 32), ("batch size", 16, 32), ("image size", 16, 32)]
    for r in rows:
        ms, samples_s = float(r[3]), float(r[5])
        assert ms > 0 and samples_s == pytest.approx(1000 * int(r[1]) / ms, rel=0.01)
        assert r[7] == "-"  # --no-rss
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert [len(p["ms_per_step"]) for p in raw] == [2, 2]  # two timed rounds (+ warm-up); the shared point once
    # Drift correction: a point's ms/step is the median of its per-round ratios to the reference (batch
    # 16, 32 px) times the reference's median; the reference's ratio is 1.
    b8, b16 = (p["ms_per_step"] for p in raw)
    ratio = statistics.median([a / b for a, b in zip(b8, b16, strict=True)])
    assert float(rows[0][3]) == pytest.approx(ratio * statistics.median(b16), abs=0.06)
    assert float(rows[1][3]) == pytest.approx(statistics.median(b16), abs=0.06)
    assert rows[0][4].startswith(f"{ratio:.2f}") and rows[1][4].startswith("1.00") and rows[1][1:] == rows[2][1:]
    assert re.search(r"time/step ~ batch\^-?[\d.]+ .* ms per sample", out)
    assert "pixels^" not in out  # an axis of one point has no fit
    assert [f.name for f in tmp_path.iterdir()] == ["raw.json"]  # --no-png


def test_bench_growth_refuses_more_steps_than_the_data_has(capsys):
    assert bench_growth.main(["--preset", "tiny", "--batch-sizes", "96", "--image-sizes", "32", "--steps", "3",
                              "--no-rss", "--no-png"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--steps 3" in err and "data.synthetic_train_size" in err


@pytest.mark.slow
def test_bench_growth_command_measures_memory_per_process_and_writes_the_plot(tmp_path):
    """The whole command as a user runs it: one process per point for the peak RSS, and the PNG."""
    out = run_benchmark("bench_growth.py", "--preset", "tiny", "--batch-sizes", "8", "16", "--image-sizes", "16", "32",
                        "--rounds", "2", "--steps", "2", "--figure-dir", str(tmp_path))
    rows = markdown_rows(out, "| axis |")
    assert [(int(r[1]), int(r[2])) for r in rows] == [(8, 32), (16, 32), (16, 16), (16, 32)]
    rss = [float(r[7]) for r in rows]
    assert all(100 < mb < 20_000 for mb in rss)  # a real process's peak: torch alone is a few hundred MB
    assert re.search(r"time/step ~ pixels\^-?[\d.]+", out)
    png = tmp_path / "growth_tiny.png"
    if "plot not written" in out:
        pytest.skip(out.split("plot not written: ")[1].splitlines()[0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_train_runs_every_variant_for_two_steps_and_prints_ratios():
    # The acceptance's smoke run: 2 steps per variant (one warm-up round, one timed), tiny preset.
    out = run_benchmark("bench_train.py", "--presets", "tiny", "--rounds", "1", "--steps", "2")
    rows = {row[1]: row for row in markdown_rows(out, "| preset | variant |")}
    expected = ["plain", "accelerate", "mmtrain-off", "mmtrain-full"]
    assert list(rows)[:4] == expected and set(rows) <= {*expected, "lightning"}
    assert rows["plain"][6:9] == ["1.000", "1.000", "1.000"]  # the ratios are to the plain loop
    for row in rows.values():
        samples_s, ms = float(row[2]), float(row[3])
        assert samples_s > 0 and samples_s * ms / 1000 == pytest.approx(16, rel=0.02)  # tiny: batch 16
        assert float(row[6]) == pytest.approx(samples_s / float(rows["plain"][2]), abs=0.002)


@pytest.mark.slow
def test_telemetry_overhead_whole_runs_print_the_paired_ratio():
    out = run_benchmark("telemetry_overhead.py", "--presets", "tiny", "--repeats", "1", "--steps", "3", "--no-warmup")
    (row,) = markdown_rows(out, "| preset | off train s |")
    off_train, full_train = float(row[1]), float(row[2])
    assert row[0] == "tiny" and off_train > 0 and full_train > 0
    # One pair: its ratio (of the unrounded times; the table shows them to 0.01 s).
    assert float(row[5].split()[0]) == pytest.approx(off_train / full_train, abs=0.002 + 0.01 / full_train)
    assert re.search(r"full telemetry speed vs off \(tiny, whole runs\): [\d.]+ +\((meets|BELOW) the 0.98 target\)",
                     out)


@pytest.mark.slow
def test_bench_host_memory_prints_both_arms_and_the_paired_ratio():
    out = run_benchmark("bench_host_memory.py", "--preset", "tiny", "--repeats", "1", "--steps", "2")
    rows = {row[0]: row for row in markdown_rows(out, "| reuse_host_memory |")}
    assert list(rows) == ["false", "true"]
    for row in rows.values():
        assert float(row[1]) > 0 and float(row[2]) > 0 and float(row[3]) > 0  # train s, faults, kernel ms per step
    ratio = float(re.search(r"speed on/off \(median of 1 paired ratios\): ([\d.]+)", out).group(1))
    # One pair: its ratio of the unrounded train times (the table shows them to 0.01 s).
    off, on = float(rows["false"][1]), float(rows["true"][1])
    assert ratio == pytest.approx(off / on, abs=0.002 + 0.01 / on)
