"""C++ extension sources (see csrc/) and the thin loader that imports them."""
