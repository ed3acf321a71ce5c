from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

import simpletuner_dmd.state_io as state_io
from simpletuner_dmd.errors import UserError
from simpletuner_dmd.lr_schedules import build_lr_lambda
from simpletuner_dmd.state_io import load_state, rng_state, save_state, set_rng_state


def roundtrip(tmp_path: Path, state):
    save_state(tmp_path / "state", state)
    return load_state(tmp_path / "state")


def bits(value: float) -> bytes:
    return struct.pack("<d", value)


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a, b):
    """Exact equality that also checks types, tensor dtypes and float bits (so nan == nan)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(raw_bytes(a), raw_bytes(b))
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, float):
        assert type(b) is float and bits(a) == bits(b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        assert [type(k) for k in a] == [type(k) for k in b]  # int keys stay int
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert type(a) is type(b) and a == b


def test_nested_structure_round_trips_exactly(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    negative_nan = struct.unpack("<d", struct.pack("<Q", 0xFFF8_0000_0000_0001))[0]
    state = {
        "ints": {0: "zero", 7: [1, 2], "mixed": True},
        "tuple": (0.9, 0.999, (1, (2, None))),
        "floats": [0.1, 1e-300, -0.0, 1 / 3, math.inf, -math.inf, math.nan, negative_nan],
        "scalars": [None, True, False, 0, -5, 2**70, "", "ünïcode"],
        "tensors": {
            "uint8": torch.randint(0, 256, (5,), dtype=torch.uint8),
            "bf16": torch.randn(3, 4).to(torch.bfloat16),
            "fp16": torch.randn(2).half(),
            "int64": torch.tensor([1, -2, 2**40]),
            "bool": torch.tensor([True, False]),
            "zero_dim": torch.tensor(3.0),
            "empty": torch.zeros(0, 4),
            "view_a": base[2:5],  # views of one storage: safetensors needs them separated
            "view_b": base[::2],  # and non-contiguous
            "same": base,
        },
        "ndarray": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "empty_list": [],
        "empty_dict": {},
    }
    state["tensors"]["same_again"] = state["tensors"]["same"]
    assert_same(state, roundtrip(tmp_path, state))


def test_files_are_a_tensor_file_plus_plain_json(tmp_path):
    save_state(tmp_path / "opt.rank0", {"a": torch.ones(2), "b": [math.inf]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt.rank0.json", "opt.rank0.safetensors"]
    document = json.loads((tmp_path / "opt.rank0.json").read_text(), parse_constant=pytest.fail)
    assert document["state"] == {"$dict": {"a": {"$tensor": "a"}, "b": [{"$float": "0x7ff0000000000000"}]}}


def test_overwrite_replaces_and_mismatched_pair_is_rejected(tmp_path):
    save_state(tmp_path / "s", {"x": torch.zeros(1)})
    old_json = (tmp_path / "s.json").read_text()
    save_state(tmp_path / "s", {"x": torch.ones(1)})
    assert torch.equal(load_state(tmp_path / "s")["x"], torch.ones(1))
    # A crash between the two renames would pair new tensors with the old skeleton.
    (tmp_path / "s.json").write_text(old_json)
    with pytest.raises(UserError, match="different saves"):
        load_state(tmp_path / "s")


def test_missing_file_is_a_user_error(tmp_path):
    save_state(tmp_path / "s", {"x": 1})
    (tmp_path / "s.safetensors").unlink()
    with pytest.raises(UserError, match="s.safetensors"):
        load_state(tmp_path / "s")


@pytest.mark.parametrize("bad", [{"k": object()}, {(1, 2): 3}, {True: 1}, {"a": np.array([object()])}])
def test_unsupported_values_fail_loudly(tmp_path, bad):
    with pytest.raises(TypeError):
        save_state(tmp_path / "s", bad)
    assert list(tmp_path.iterdir()) == []


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    scheduler = LambdaLR(optimizer, build_lr_lambda("cosine", warmup_steps=2, total_steps=10))
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int, generator: torch.Generator):
    for _ in range(steps):
        x = torch.randn(16, 4, generator=generator)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def test_adamw_and_lambdalr_resume_bitwise(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer()
    generator = torch.Generator().manual_seed(1)
    _train(model, optimizer, scheduler, 3, generator)
    save_state(
        tmp_path / "training",
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
        },
    )
    _train(model, optimizer, scheduler, 4, generator)  # the uninterrupted run

    loaded = load_state(tmp_path / "training")
    assert type(loaded["optimizer"]["param_groups"][0]["betas"]) is tuple
    assert all(type(k) is int for k in loaded["optimizer"]["state"])
    resumed, resumed_opt, resumed_sched = _model_and_optimizer(seed=99)  # different init on purpose
    resumed.load_state_dict(loaded["model"])
    resumed_opt.load_state_dict(loaded["optimizer"])
    resumed_sched.load_state_dict(loaded["scheduler"])
    resumed_gen = torch.Generator()
    resumed_gen.set_state(loaded["generator"])
    _train(resumed, resumed_opt, resumed_sched, 4, resumed_gen)

    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert_same(optimizer.state_dict(), resumed_opt.state_dict())
    assert_same(scheduler.state_dict(), resumed_sched.state_dict())
    assert scheduler.get_last_lr() == resumed_sched.get_last_lr()


def test_rng_states_round_trip_exactly(tmp_path):
    generator = torch.Generator().manual_seed(123)
    torch.randn(3, generator=generator)
    states = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    loaded = roundtrip(tmp_path, states)
    assert_same(states, loaded)
    assert loaded["python"] == random.getstate()  # a tuple again, so random.setstate accepts it
    fresh = torch.Generator()
    fresh.set_state(loaded["generator"])
    assert torch.equal(torch.randn(5, generator=fresh), torch.randn(5, generator=generator))


def test_rng_state_set_reproduces_draws(tmp_path):
    save_state(tmp_path / "rng", rng_state())
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    set_rng_state(load_state(tmp_path / "rng"))
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_checkpoint_code_never_uses_pickle():
    # The one place the forbidden call is named: asserting the checkpoint code does not use it.
    package = Path(state_io.__file__).parent
    for path in [package / "state_io.py", *sorted((package / "hosts" / "reference").glob("*.py"))]:
        source = path.read_text()
        assert "torch.load" not in source and "import pickle" not in source, path


def test_load_weights_into_checks_every_name_before_copying(tmp_path):
    from simpletuner_dmd.state_io import load_weights_into, save_weights

    save_weights({"a": torch.ones(2), "b": torch.full((3,), 2.0)}, tmp_path / "w.safetensors")
    live = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(3)}
    load_weights_into(live, tmp_path / "w.safetensors", "test weights")
    assert torch.equal(live["a"], torch.ones(2, dtype=torch.float64)) and live["a"].dtype == torch.float64
    live = {"a": torch.zeros(2), "c": torch.zeros(1)}
    with pytest.raises(UserError, match="test weights does not match this model: missing c"):
        load_weights_into(live, tmp_path / "w.safetensors", "test weights")
    assert not live["a"].any()  # nothing copied before the error
