"""The benchmark harness behind ``tally bench``: load generator, workloads, peers, reports.

Load is generated in separate processes (one event loop each, raw HTTP/1.1 keep-alive
connections) so that on a small machine the generator is not what is being measured.
"""
