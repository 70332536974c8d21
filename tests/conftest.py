"""Shared test settings: a hypothesis profile sized for a 2-core CI machine."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU, Triton kernels run in Triton's interpreter, which must be switched on before
# anything imports triton: transformers (tests/test_hf.py) imports it too, and a worker that ran
# those tests first would otherwise hold a compiled-mode triton when tests/test_triton.py starts.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") or os.environ.get("PIXELFLY_QUICK") else "dev")

# One torch thread per test process: pytest-xdist already runs one process per core, and more
# threads than cores make small matmuls several times slower on a 2-core machine.
torch.set_num_threads(1)


@pytest.fixture
def other_process_registry(monkeypatch):
    """The layout registry as a new process has it: empty, so a key from this process names nothing.

    Returns:
        The registry module (its state restored after the test).
    """
    from pixelfly_lab.ops import registry
    monkeypatch.setattr(registry, "_ENTRIES", [])
    monkeypatch.setattr(registry, "_KEYS", {})
    monkeypatch.setattr(registry, "_DERIVED", {})
    return registry
