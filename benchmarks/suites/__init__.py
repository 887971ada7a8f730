"""The registered benchmark suites (``python -m benchmarks.run --suite NAME``): each is a plain
``run(options) -> SuiteReport``, registered in ``benchmarks.run.SUITES``."""
