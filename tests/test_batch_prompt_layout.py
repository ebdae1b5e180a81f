"""The default job's prompt layout (`--prompt-layout`) and `--instruction`: the instruction follows the row's
text in the user turn and survives truncation. The embedded SmolLM2 tokenizer and chat template."""
from __future__ import annotations

import pytest

from strata.batch.cli import SEED_SYSTEM_PROMPT, SUMMARY_INSTRUCTION, apply_defaults, job_options
from strata.batch.jobs import JobBuilder, JobOptions
from strata.batch.readers import Record


@pytest.fixture(scope="module")
def tok():
    from strata.engine.tokenizer import Tokenizer
    from strata.models.embedded import default_model_path
    return Tokenizer.from_gguf(default_model_path())


def parse(*argv):
    from strata.cli import build_parser
    return build_parser("batch").parse_args(["batch", *argv])


def test_default_job_layouts():
    o = job_options(apply_defaults(parse()), "plain")
    assert (o.system_prompt, o.instruction) == (None, SUMMARY_INSTRUCTION)
    assert o.sampling == {"max_tokens": 100, "temperature": 0.0, "repetition_penalty": 1.1}
    o = job_options(apply_defaults(parse("--prompt-layout", "seed")), "plain")  # the seed notebook's job
    assert (o.system_prompt, o.instruction) == (SEED_SYSTEM_PROMPT, None)
    assert o.sampling == {"max_tokens": 100, "temperature": 0.0}
    o = job_options(apply_defaults(parse("--system-prompt", "Be brief.", "--repetition-penalty", "1.0")), "plain")
    assert (o.system_prompt, o.instruction) == ("Be brief.", None)  # the user's prompt and sampling win
    assert o.sampling["repetition_penalty"] == 1.0
    a = apply_defaults(parse())
    assert a.output == "out/summaries.jsonl" and a.max_input_tokens == 512 and a.limit == 64
    with pytest.raises(ValueError, match="--prompt-layout"):
        apply_defaults(parse("--input", "x.jsonl", "--prompt-layout", "seed"))
    with pytest.raises(ValueError, match="--instruction"):
        job_options(apply_defaults(parse("--input", "x.jsonl", "--messages-field", "m", "--instruction", "Hi")), "plain")


def test_instruction_after_the_text_and_kept_whole_when_truncated(tok):
    text = "A post about the quick brown fox. " * 40
    rendered = tok.apply_chat_template([{"role": "user", "content": text + "\n\nSummarize it."}],
                                       add_generation_prompt=True, tokenize=False)
    b = JobBuilder(JobOptions(instruction="Summarize it."), tok)
    job = b.build(Record(0, data={"text": text}), "0", 0)
    assert job.prompt_ids == tok.encode(rendered, add_special_tokens=False) and not job.truncated

    b = JobBuilder(JobOptions(instruction="Summarize it.", max_input_tokens=64), tok)
    recs = [Record(i, data={"text": text}) for i in range(2)]
    b.prepare(recs[:1])  # the batched tokenisation path, and the per-row one, give the same prompt
    jobs = [b.build(r, str(r.row), r.row) for r in recs]
    assert jobs[0].prompt_ids == jobs[1].prompt_ids
    job = jobs[0]
    assert job.truncated and len(job.prompt_ids) == 64
    assert job.untruncated_tokens == len(tok.encode(rendered, add_special_tokens=False))
    decoded = tok.decode(job.prompt_ids, skip_special_tokens=False)
    assert decoded.endswith("\n\nSummarize it.<|im_end|>\n<|im_start|>assistant\n")
    assert decoded.count("Summarize it.") == 1 and "A post about the quick brown fox." in decoded

    # without a chat template: the text, a blank line, the instruction; the instruction is kept too
    b = JobBuilder(JobOptions(instruction="Summarize it.", max_input_tokens=32, chat_template=False), tok)
    job = b.build(Record(0, data={"text": text}), "0", 0)
    assert job.truncated and len(job.prompt_ids) <= 32
    assert tok.decode(job.prompt_ids).endswith("Summarize it.")
