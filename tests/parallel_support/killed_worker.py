"""A TP=2 engine whose worker is SIGKILLed mid-generation: the pending step and every later one must fail with
EngineDeadError, quickly, and the process must exit. Prints one JSON line for the test.

With `structured` as the second argument, the requests are under a JSON schema (overlapped steps) and the worker
is killed after the step's forward is launched and before its held-back sampling (which then broadcasts the
sampled ids to the dead worker)."""
import json
import os
import signal
import sys
import time

import torch

if __name__ == "__main__":
    from strata.core.errors import EngineDeadError
    from strata.core.sampling_params import SamplingParams
    from strata.engine.llm_engine import LLMEngine
    from tests.parallel_support import engine_args

    structured = sys.argv[2:] == ["structured"]
    extra = dict(async_scheduling=True, load_format="dummy") if structured else {}  # (a config + tokenizer dir)
    engine = LLMEngine.from_engine_args(engine_args(sys.argv[1], tensor_parallel_size=2, **extra))
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    if structured:
        from strata.core.sampling_params import StructuredOutputsParams
        params = SamplingParams(max_tokens=200, temperature=0.0, structured_outputs=StructuredOutputsParams(
            json={"type": "object", "properties": {"t": {"type": "string", "minLength": 400}}, "required": ["t"]}))
        sample_grammar = engine._sample_grammar

        def kill_then_sample(handle):
            if steps >= 2 and killed_at is None:
                kill()
                # the ids' broadcast to one peer fits gloo's socket buffer and succeeds; a barrier, as NCCL's
                # broadcast would, waits for the dead peer and fails
                link = engine.runner.runner.link
                share = link.share_sampled
                link.share_sampled = lambda t, n: (torch.distributed.barrier(group=link.tp.group), share(t, n))[1]
            sample_grammar(handle)
        engine._sample_grammar = kill_then_sample

    def kill():
        global killed_at
        os.kill(engine.runner.worker_pids[0], signal.SIGKILL)
        killed_at = time.monotonic()
    for i in range(3):
        engine.add_request(str(i), [5 + i, 6, 7, 8], params)
    steps, killed_at, error, later = 0, None, None, None
    try:
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
            if steps == 2 and not structured:
                kill()
    except EngineDeadError as e:
        error = str(e)
    failed_after = time.monotonic() - killed_at if killed_at else None
    try:  # a dead engine refuses further work at once
        engine.add_request("late", [5, 6], params)
        engine.step()
    except EngineDeadError as e:
        later = str(e)
    print(json.dumps({"steps": steps, "structured": structured, "error": error, "failed_after_s": failed_after, "later": later}), flush=True)
