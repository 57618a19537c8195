//! Benchmarks: loader, train step, eval and decomposition throughput.
