"""report/summary.py: the stdout table, fixed width, "—" for what is absent or not finite."""

from __future__ import annotations

from report_fixtures import make_run

from fused_stream.report.summary import summary_table


def test_summary_table():
    small = make_run("baseline", 6)
    big = make_run("ttt", 6, text=False, seed=1)
    big.metrics["flat"]["librilight_loss_24k"] = 1.5
    big.driver_report["memory"] = {"peak_bytes": 512 * 2**20, "constant_memory": None}
    del big.driver_report["frames_per_second"]
    small.driver_report["throughput"] = {"steady_frames_per_second": 2000.0}
    small.driver_report["per_file"] = [{"name": "a", "frames": 6}, {"name": "b", "frames": 4}]
    big.driver_report["ranks"] = [{"per_file": [{"name": "a", "frames": 6}]},
                                  {"per_file": [{"name": "b", "frames": 5}]}]
    small.driver_report["verification"] = {"passed": True, "frames": [40, 40], "fraction_of_run": 0.0163}
    big.driver_report["verification"] = {"skipped": "verify=False"}
    lines = summary_table([small, big]).splitlines()
    assert lines[0].split() == ["baseline", "ttt"]
    assert set(lines[1]) == {"-", " "}
    rows = {line[:20].strip(): line[20:].split() for line in lines[2:]}
    width = len(lines[0])
    assert all(len(line) == width for line in lines)  # fixed width
    assert rows["frames (total)"] == ["10", "11"] and rows["sequences"] == ["2", "2"]  # the sum, every rank
    assert rows["loss combined"] == ["3.1416", "3.1416"]
    assert rows["loss text"] == ["1.2500", "—"]
    assert rows["librilight_loss_8k"] == ["2.3457", "2.3457"]
    assert "librilight_loss_16k" not in rows  # NaN in every run: no row
    assert rows["librilight_loss_24k"] == ["—", "1.5000"]  # absent / present
    assert rows["librilight_slope"] == ["-0.01235", "-0.01235"]
    assert rows["frames/s (steady)"] == ["2,000.0", "—"]  # the headline: after warm-up
    assert rows["frames/s (overall)"] == ["1,234.6", "—"]  # beside it: setup included
    assert [name for name in rows if name.startswith("frames/s")] == ["frames/s (steady)", "frames/s (overall)"]
    assert rows["peak memory"] == ["1.50", "GiB", "512.0", "MiB"]
    assert rows["constant memory"] == ["yes", "unknown"]
    assert rows["verified (frames)"] == ["40+40", "(1.6%)", "off"]


def test_summary_table_without_text_has_no_text_row():
    assert "loss text" not in summary_table([make_run("m", 4, text=False)])


def test_rows_no_run_reaches_are_left_out_and_an_unknown_total_is_a_dash():
    run = make_run("m", 4)
    run.metrics["flat"] = {"librilight_slope": -0.01}
    rows = {line[:20].strip(): line[20:].split() for line in summary_table([run]).splitlines()[2:]}
    assert not [name for name in rows if name.startswith("librilight_loss")]
    assert rows["frames (total)"] == ["—"] and "frames" not in rows  # no per-file report: unknown, not guessed


def test_speed_rows_sum_the_ranks_and_a_rank_without_a_rate_is_unknown():
    run = make_run("m", 4)
    run.driver_report["ranks"] = [
        {"frames_per_second": 10.0, "throughput": {"steady_frames_per_second": 30.0}},
        {"frames_per_second": 20.0, "throughput": {"steady_frames_per_second": 50.0}},
    ]
    rows = {line[:20].strip(): line[20:].split() for line in summary_table([run]).splitlines()[2:]}
    assert rows["frames/s (steady)"] == ["80.0"] and rows["frames/s (overall)"] == ["30.0"]
    run.driver_report["ranks"][1]["throughput"] = {"steady_frames_per_second": None}  # too few samples on a rank
    rows = {line[:20].strip(): line[20:].split() for line in summary_table([run]).splitlines()[2:]}
    assert rows["frames/s (steady)"] == ["—"] and rows["frames/s (overall)"] == ["30.0"]


def test_values_carry_their_stderr_and_the_comparison_table_follows():
    from fused_stream.report.summary import summary_table

    base, new = make_run("base", 40), make_run("new", 40, seed=1)
    new.metrics["uncertainty"] = {"loss_combined": {"value": 3.14159265, "stderr": 0.0123, "ci95": [3.1, 3.2]}}
    comparisons = [{"model": "new", "baseline": "base", "metric": "loss_combined", "delta": -0.0421,
                    "ci95": [-0.06, -0.02], "p_value": 0.001, "wins": 17, "n_units": 20},
                   {"model": "new", "baseline": "base", "metric": "window_0_10", "delta": -0.1,
                    "ci95": [-0.2, 0.0], "p_value": 0.2, "wins": 1, "n_units": 2}]
    text = summary_table([base, new], {"signature": "method:x|B:1000|seed:1", "comparisons": comparisons})
    loss_row = next(line for line in text.splitlines() if line.startswith("loss combined"))
    assert "3.1416 ± 0.0123" in loss_row and loss_row.split()[2] == "3.1416"  # base: no stderr, the value alone
    assert "method:x|B:1000|seed:1" in text
    row = next(line for line in text.splitlines() if line.startswith("loss_combined"))
    assert row.split() == ["loss_combined", "new", "-0.0421", "[-0.0600,", "-0.0200]", "0.001", "17/20"]
    assert "window_0_10" not in text  # the JSON has every window; the table the headline numbers
    assert "not that one is better" in text
