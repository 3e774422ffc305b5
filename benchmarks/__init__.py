"""dsv2 benchmark suite (not part of the test suite): `python -m benchmarks --help`.

Every figure is measured in the same run as its peer, on the same weights: one checkpoint is written once with
dsv2's save_pretrained and loaded by both dsv2.from_pretrained and transformers' from_pretrained. Results go to
benchmarks/results/ (results.md, results.json, PNG plots), stamped with date, CPU, cores, threads, torch version
and the load average.
"""
