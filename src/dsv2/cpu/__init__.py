"""CPU fast paths: the C++ kernels (kernels/, compiled at first use by build.py) and the code that calls them."""
