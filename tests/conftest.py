"""Test set-up shared by the whole suite.

On a machine without CUDA the triton backend is tested on CPU tensors through the interpreter
(``TRITON_INTERPRET=1``; the backend reads it at call time).

Seeding: every test starts from a fresh seed, derived from a session seed and the test's id, set as
torch's global seed and handed to tests that ask for the ``seed`` fixture (for their own generators).
The session seed is printed in a failing test's captured output; ``FASTPROMPT_TEST_SEED=<n>`` replays it.
"""

import os
import secrets
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_SESSION_SEED = int(os.environ.get("FASTPROMPT_TEST_SEED", secrets.randbelow(2**31)))


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    """This test's seed (torch's global RNG is seeded with it)."""
    value = (_SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    print(f"replay with FASTPROMPT_TEST_SEED={_SESSION_SEED} (this test's seed: {value})")
    torch.manual_seed(value)
    return value
