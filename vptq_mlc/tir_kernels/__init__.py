"""TIR kernels for VPTQ linears. Each builder takes a layer config + dtype (+ target) and returns a PrimFunc;
`registry.select_vq_matmul` picks one per (config, target, static batch). No model knowledge here."""
