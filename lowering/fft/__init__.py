"""The CPU FFTs of the Toeplitz forms: an in-place convolver the scores kernels inline
(convolve.py), a batched real FFT in TVMScript (real.py) and the packed functions the values
kernels call (packed.py)."""
