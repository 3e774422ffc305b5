"""The C++ CPU kernels (mla_decode.cpp, few_rows.cpp and their shared tiles.h, rms_norm.cpp; one extension) and
the build that compiles them at first use (build.py). fastpath.py is what calls them."""
