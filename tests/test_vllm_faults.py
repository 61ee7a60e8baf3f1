"""vLLM engines that start in unusual conditions, each alone in the process (the engine of test_vllm_engine.py is
closed by then): a prefix directory made for another model is refused at start; a KV cache small enough to preempt
requests still gives fastprompt's answers; two tensor-parallel workers (in a process of their own) too.

Runs in vLLM's own environment (``.ci/vllm-env DIR``, then ``DIR/bin/pytest -m vllm``); skipped elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; build its environment with .ci/vllm-env DIR and "
                    "run DIR/bin/pytest -m vllm")

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm_cases import (  # noqa: E402
    AdapterCase,
    Reference,
    assert_equal_reference,
    build_setup,
    close,
    engine,
    generate,
    random_prompts,
    save_adapters,
    save_model,
)

import fastprompt  # noqa: E402
from fastprompt.engines.vllm import BASE, PromptAdapters  # noqa: E402
from fastprompt.engines.vllm.store import write_store  # noqa: E402

pytestmark = pytest.mark.vllm


def test_prefix_of_another_model_is_refused_at_engine_start(tmp_path):
    """A prefix directory written for a 3-layer model, handed to an engine of the 2-layer one: the workers refuse it
    at start, naming the prefix and the layer count, instead of serving wrong keys."""
    model_dir = save_model(tmp_path / "model")
    other_dir = save_model(tmp_path / "other", layers=3)
    exporter = Reference(other_dir, save_adapters(tmp_path, {"deep3": AdapterCase("prefix", 5)}, layers=3), {})
    write_store(tmp_path / "store", {"deep3": fastprompt.export_prefix_kv(exporter.model, "deep3")})
    with pytest.raises(Exception, match="'deep3'.*layers"):  # noqa: B017 - vLLM may wrap the worker's ValueError
        engine(PromptAdapters(model_dir, directory=tmp_path / "store"))


def test_preempted_requests_still_equal_fastprompt_generate(tmp_path, monkeypatch):
    """A cache of 12 blocks of 32 for 10 requests of 2 to 5 blocks each as they grow by 48 tokens: vLLM preempts
    and resumes requests (their prefixes written again where the prefix cache lost them); every answer stays
    equal."""
    setup = build_setup(tmp_path)
    adapters = PromptAdapters(setup[0], setup[1], prompts=setup[2])
    small = engine(adapters, num_gpu_blocks_override=12, max_num_seqs=10)
    scheduler = small.llm_engine.engine_core.engine_core.scheduler
    preempted = []
    preempt = scheduler._preempt_request

    def counting_preempt(request, *args, **kwargs):
        preempted.append(request.request_id)
        return preempt(request, *args, **kwargs)

    monkeypatch.setattr(scheduler, "_preempt_request", counting_preempt)
    try:
        names = ["lstm", "deep", "twin", "proj", BASE, "mlp", "lstm", "soft", "fewshot", "exported"]
        rows = list(zip(names, random_prompts(len(names), 20, 40, seed=4), strict=True))
        answers = generate(small, adapters, rows, new_tokens=48)
    finally:
        close(small)
    assert preempted, "the small cache preempted no request: the test tests nothing"
    assert_equal_reference(answers, rows, Reference(*setup))


_TENSOR_PARALLEL = """
import sys
from pathlib import Path

sys.path.insert(0, {tests!r})

def main():
    import vllm
    from vllm_cases import BLOCK, MAX_MODEL_LEN, Reference, assert_equal_reference, build_setup, generate
    from vllm_cases import random_prompts
    from fastprompt.engines.vllm import PromptAdapters

    setup = build_setup(Path({root!r}))
    adapters = PromptAdapters(setup[0], setup[1], prompts=setup[2])
    llm = vllm.LLM(**adapters.engine_args(block_size=BLOCK, skip_tokenizer_init=True, max_model_len=MAX_MODEL_LEN,
                                          tensor_parallel_size=2))
    names = ["proj", "deep", "mlp", "lstm", "soft", "fewshot", "exported", "__base__"]
    rows = list(zip(names, random_prompts(len(names), 3, 20, seed=6), strict=True))
    assert_equal_reference(generate(llm, adapters, rows), rows, Reference(*setup))
    print("tensor-parallel answers equal")

if __name__ == "__main__":
    main()
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two tensor-parallel CPU workers need two CPUs to bind to")
def test_two_tensor_parallel_workers_each_write_their_own_heads(tmp_path):
    """Two CPU workers (the tiny model's 2 key/value heads, one each): every adapter kind equal to fastprompt's
    generate. vLLM's CPU build binds each worker's threads to a NUMA node unless told the cores (one node here)."""
    script = tmp_path / "tensor_parallel.py"
    script.write_text(_TENSOR_PARALLEL.format(tests=str(Path(__file__).parent), root=str(tmp_path)))
    env = {key: value for key, value in os.environ.items() if key != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tensor-parallel answers equal" in done.stdout
