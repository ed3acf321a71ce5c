"""``benchmarks/gpu_cost.py``'s code path on a CPU: the single-GPU rows of FSDP2 and context parallelism (issue 29,
item 6) build and step through the reference host's own keys, and what the host refuses is refused before any run."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_cost


def test_fsdp_and_context_parallel_1_on_one_process_are_the_plain_run(monkeypatch):
    """``+fsdp`` and ``+cp1`` reach the host's keys, and with one process the host spreads nothing: the passes call
    the bare network, and the step runs the same passes as the plain row (what the GPU then times and measures)."""
    rows = {}
    for options in (("bf16",), ("bf16", "fsdp"), ("bf16", "cp1")):
        rows[options] = gpu_cost.run_one("tiny", "dmd", steps=1, device="cpu", rank=4, options=options)
    plain = rows[("bf16",)]
    assert rows[("bf16", "fsdp")]["host_keys"] == {"base_model_precision": "no_change", "fsdp_enable": True}
    assert rows[("bf16", "cp1")]["host_keys"] == {"base_model_precision": "no_change", "context_parallel_size": 1}
    for row in rows.values():
        assert not row["oom"] and row["step_s"] > 0
        assert row["network"] == plain["network"] == "WanTransformer3DModel"
        assert row["passes"] == plain["passes"]


def test_fsdp_with_an_int8_base_is_refused_as_the_host_refuses_it(capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_cost.main(["--run", "tiny:dmd+fsdp", "--device", "cpu"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--run tiny:dmd+fsdp: config.fsdp_enable: cannot shard an int8-quanto base" in err


def test_an_unknown_option_is_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_cost.main(["--run", "tiny:dmd+fsdp2", "--device", "cpu"])
    assert "OPTION in ['bf16', 'cp1', 'fsdp', 'offload']" in capsys.readouterr().err


def test_the_rows_file_names_each_option(tmp_path):
    rows = [{"model": "tiny", "kind": "dmd", "options": ["bf16", "fsdp"], "oom": False, "step_s": 1.0},
            {"model": "tiny", "kind": "dmd", "options": ["bf16", "cp1"], "skipped": "time budget spent"}]
    args = gpu_cost.argparse.Namespace(device="cpu", out=tmp_path, memory_cap_gib=None, rank=4, steps=1)
    gpu_cost._write(args, rows)
    table = (tmp_path / "gpu_cost_cpu.md").read_text()
    assert "| tiny | DMD, fake score = adapter on the shared base, bf16 base, fsdp_enable on 1 process | — | 1.00 |" in table
    assert "bf16 base, context_parallel_size 1 | — | not run (time budget spent)" in table
    assert json.loads((tmp_path / "gpu_cost_cpu.json").read_text())["rows"] == rows
