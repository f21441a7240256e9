"""Helpers shared by the tests, imported one way: `from tests.helpers.<module> import ...`.

    inputs   small NSA configs, random q/k/v/gates and packed documents, the relative error
    kernels  the compiled-or-interpreted kernel test base and the CUDA lowering check
    models   a tiny ModelConfig whose NSA is genuinely sparse, a jitted forward
    runs     configs/tiny.py shrunk to seconds, run helpers
    selection  issue 20's non-finite selection cases and injected random scores
"""
