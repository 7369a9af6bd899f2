"""Evaluation stage: answering (generation, likelihood), LLM judge, cache, merge; the benchmark registry it reads is
:mod:`merv.data.benchmarks`.

Entry points: :func:`merv.eval.benchmark.evaluate` (one benchmark or chunk), :func:`merv.eval.merge.merge_results`,
:func:`merv.eval.merge.collect_results`, :func:`merv.eval.likelihood.continuation_logprobs`.
"""
