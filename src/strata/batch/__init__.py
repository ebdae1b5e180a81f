"""Batch inference over data sets: streaming readers, resumable JSONL output, sharding over ranks,
data parallelism, Slurm job scripts. See docs/BATCH.md.

Modules: readers (input formats), jobs (rows -> engine requests -> output rows), output (writer, resume,
merge), runner (the bounded job loop over an engine), sharding (ranks), dp (one-node data parallelism),
progress, cli (`strata batch`), slurm_cli (`strata slurm batch`)."""
