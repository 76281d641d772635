"""What the tests and the benchmarks share: a throwaway PostgreSQL server (pgserver) and stand-in trials
with the study files they run on (stand_ins). Not part of the harness; not installed with it."""
