"""The command line, the demo and the benchmark command: the top of the stack."""
