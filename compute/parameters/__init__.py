"""Features in parameter space: directions in weight space along which some inputs' outputs change sharply
(sparse Hessian eigendecomposition, seed 002)."""
