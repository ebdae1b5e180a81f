"""A TP=2 engine whose worker is SIGKILLed mid-generation: the pending step and every later one must fail with
EngineDeadError, quickly, and the process must exit. Prints one JSON line for the test."""
import json
import os
import signal
import sys
import time

if __name__ == "__main__":
    from strata.core.errors import EngineDeadError
    from strata.core.sampling_params import SamplingParams
    from strata.engine.llm_engine import LLMEngine
    from tests.parallel_support import engine_args

    engine = LLMEngine.from_engine_args(engine_args(sys.argv[1], tensor_parallel_size=2))
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    for i in range(3):
        engine.add_request(str(i), [5 + i, 6, 7, 8], params)
    steps, killed_at, error, later = 0, None, None, None
    try:
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
            if steps == 2:
                os.kill(engine.runner.worker_pids[0], signal.SIGKILL)
                killed_at = time.monotonic()
    except EngineDeadError as e:
        error = str(e)
    failed_after = time.monotonic() - killed_at if killed_at else None
    try:  # a dead engine refuses further work at once
        engine.add_request("late", [5, 6], params)
        engine.step()
    except EngineDeadError as e:
        later = str(e)
    print(json.dumps({"steps": steps, "error": error, "failed_after_s": failed_after, "later": later}), flush=True)
