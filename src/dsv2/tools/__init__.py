"""Tools around the model: the parameter/KV/FLOP calculator, the routing simulator, run plots."""
