"""Experiments: a baseline and a candidate (config overrides and/or a patch) trained over the same seeds, judged
by the paired difference with its interval and a test, winners confirmed on fresh seeds, every outcome appended to
a ledger. Built on the study machinery: arms (what a run is, and its name), runner (study executor and aggregate),
decision (study stats), ledger (atomic JSONL), patch (an isolated copy of the source tree), tune (a searcher)."""
