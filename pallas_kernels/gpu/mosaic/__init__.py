"""Mosaic GPU kernels for Hopper (wgmma, TMA, warp-specialised producers). `common` holds what
they share; each other module is one kernel family: its kernels, custom_vjp and tile options."""
