"""Applications built on the library: the latency benchmark (`bench`) and the end-to-end demo (`demo`)."""
