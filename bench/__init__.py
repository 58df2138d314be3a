"""visiontune's benchmark suite: each script is a module (`python -m bench.NAME ...`) that
records its figures through `bench.harness` as rows of `bench/results/NAME.csv`;
`python -m bench.report` writes bench/RESULTS.md from those files."""
