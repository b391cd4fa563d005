"""Examples: the `make demo` script (`examples.demo`), its Luigi pipeline and a sample policy."""
