"""The T5.1.1 encoder-decoder with grouped-query attention: config, layers, attention, network,
decoding and the parameter table. Imports only jax, flax and numpy; the CPU kernels are looked up
when a config asks for them."""
