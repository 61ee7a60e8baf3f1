"""``torch.compile`` of a patched PEFT model: forward and backward trace as one graph (``fullgraph=True``
fails on any graph break) and give eager's logits, loss and gradients.

Most cases use the ``aot_eager`` backend: it runs Dynamo's and AOTAutograd's tracing, which is where a graph
break comes from, without the C++ code generation of inductor, whose time a loaded 2-core CPU multiplies.
One case compiles with inductor: about 50 s of CPU time with a cold inductor cache.
"""

from __future__ import annotations

import pytest
import torch
from models import assert_scaled_close, random_batch, tiny_peft_model

import fastprompt

# aot_eager runs the eager kernels in the traced order; inductor fuses and reorders float32 sums
TOLERANCE = {"aot_eager": 1e-5, "inductor": 1e-4}

@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    ok = fastprompt.available_backends("cpu")["cpu"][0]
    monkeypatch.setenv("FASTPROMPT_BACKEND", "cpu" if ok else "torch")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _run(call, model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, loss and the gradient of every trainable parameter of ``model`` after ``call(**batch)``."""
    model.zero_grad(set_to_none=True)
    out = call(**batch)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize(
    ("method", "backend"),
    [(method, "aot_eager") for method in ("prefix_projection", "prefix", "p_tuning_mlp", "p_tuning_lstm",
                                          "prompt_tuning")] + [("prefix", "inductor")],
)
def test_compiled_training_step_has_no_graph_break_and_matches_eager(method, backend, seed):
    model = fastprompt.patch(tiny_peft_model("llama", method, gqa=True, seed=seed)).train()
    batch = random_batch(2, 8, padding="right", seed=seed)
    # compiled first: a patched model needs no eager call before it compiles
    got = _run(torch.compile(model, backend=backend, fullgraph=True), model, batch)
    expected = _run(model, model, batch)
    tol = TOLERANCE[backend]
    assert_scaled_close(got[0], expected[0], tol, f"{method} {backend} logits")
    assert_scaled_close(got[1], expected[1], tol, f"{method} {backend} loss")
    assert got[2].keys() == expected[2].keys()
    for name, grad in got[2].items():
        assert_scaled_close(grad, expected[2][name], tol, f"{method} {backend} grad {name}")
