"""The runtime's edges: a request's parameters are validated once, by the one front end that Engine and the server
share, and --device text is parsed once, at the CLI.

Real tiny llvm model (tests/conftest.py) behind the real app on 127.0.0.1.
"""

from __future__ import annotations

import httpx
import pytest
from click.testing import CliRunner

import vptq_mlc.runtime.device as device_module
from vptq_mlc.cli import main
from vptq_mlc.errors import GenerationError
from vptq_mlc.runtime import Engine
from vptq_mlc.runtime.device import DeviceSpec, Placement, parse_placement
from vptq_mlc.runtime.sampling import SamplingParams
from vptq_mlc.serve.server import ServerThread


@pytest.fixture(scope="module")
def engine(tiny_served_model):
    _, model_dir, lib = tiny_served_model
    return Engine(model_dir, lib, device="cpu", max_batch_size=2, max_total_tokens=2048)


@pytest.fixture
def validations(monkeypatch):
    """How many times SamplingParams.validate runs."""
    calls = []
    real = SamplingParams.validate

    def counted(self: SamplingParams) -> None:
        calls.append(self)
        real(self)

    monkeypatch.setattr(SamplingParams, "validate", counted)
    return calls


def test_request_params_are_validated_once_on_every_path(engine, validations) -> None:
    assert engine.generate([5, 6, 7], max_tokens=2, temperature=0) is not None
    assert len(validations) == 1  # built by the front end; add_request and the sampler trust it
    validations.clear()
    with ServerThread(engine, max_queue=4) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        assert len(validations) == 1
        validations.clear()
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert len(validations) == 1


def test_bad_parameter_is_the_same_error_from_engine_and_server(engine, monkeypatch) -> None:
    """A model default out of range (mlc-chat-config.json temperature -0.5) reaches both paths through the one
    front end: Engine raises it, the server answers it as a 400 with the same message."""
    monkeypatch.setattr(engine.frontend.config, "temperature", -0.5)
    want = "temperature must be >= 0 (0 = greedy), got -0.5"
    with pytest.raises(GenerationError) as e:
        engine.generate([5, 6, 7], max_tokens=2)
    assert str(e.value) == want
    with ServerThread(engine, max_queue=4) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            r = c.post(path, json=body)
            assert r.status_code == 400
            assert r.json() == {"error": {"message": want, "type": "invalid_request_error", "param": None,
                                          "code": None}}
        # a request that sets the field itself is not refused for the model's default
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text


def test_device_text_is_parsed_once_at_the_cli(tiny_served_model, monkeypatch) -> None:
    _, model_dir, lib = tiny_served_model
    parsed = []
    real = device_module.parse_device
    monkeypatch.setattr(device_module, "parse_device", lambda text: parsed.append(text) or real(text))
    r = CliRunner().invoke(main, ["chat", str(model_dir), "--lib", str(lib), "--device", "cpu", "--prompt", "hi",
                                  "--max-tokens", "2", "--temperature", "0"])
    assert r.exit_code == 0, r.output
    assert parsed == ["cpu"]  # the CLI's one parse; Engine, the library loader and find_library get DeviceSpecs


def test_placement() -> None:
    cpu = DeviceSpec("cpu")
    assert parse_placement("auto") == Placement() and parse_placement(" CPU ") == Placement((cpu,))
    assert parse_placement("auto", "cuda:0,cuda:1") == Placement((DeviceSpec("cuda", 0), DeviceSpec("cuda", 1)))
    assert parse_placement("cuda", "cpu") == Placement((cpu,))  # --devices overrides --device; one = single
    placement = Placement((cpu, DeviceSpec("cpu", 1)))
    assert parse_placement(placement) is placement and placement.split and str(placement) == "cpu,cpu:1"
    for device, devices, message in (("cpu:3", None, "the host's CPU is one device"),
                                     ("auto", "cpu:1", "the host's CPU is one device"),
                                     ("auto", "cpu:0,auto", "explicit devices"),
                                     ("auto", "cpu:0,cuda:1", "mixes device kinds"),
                                     ("auto", " , ", "--devices is empty"),
                                     ("gpu", None, "unknown device 'gpu'")):
        with pytest.raises(device_module.RuntimeLoadError, match=message):
            parse_placement(device, devices)
