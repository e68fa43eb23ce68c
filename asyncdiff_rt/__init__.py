"""asyncdiff_rt: asynchronous denoising runtime."""
