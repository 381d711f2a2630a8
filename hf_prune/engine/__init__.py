"""The calibration engine: one decoder layer on the device at a time.

``loop`` is the per-layer loop every path uses; ``capture`` records layer 0's inputs and
each layer's call arguments; ``layer_pass`` runs a layer with statistics hooks;
``statistics`` sums what methods read (column norms, Gram matrices); ``chunking`` runs
blocks a few samples at a time; ``offload`` onloads accelerate-offloaded layers and
``activations`` places calibration activations; ``parallel`` and ``distributed`` spread
independent layers over devices and ranks; ``host_memory`` tunes the CPU allocator.
"""
