"""Pure, jitted array maths of PrinMix: SVD, GPTQ, error table, RTC, packing.

Nothing here imports I/O, model or CLI code.
"""
